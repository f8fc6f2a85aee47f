"""Batched multi-view augmentation: shapes, recipes, per-record determinism, each op doing what
it says, and a smoke run of ``sslp bench data``."""

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF

from ssl_platform.bench import LONG_PASS_BATCHES, format_bench, run_data_bench
from ssl_platform.data.augment import RESIZE_EACH_MIN_SIDE
from ssl_platform.data.builtin import DIGIT_NAMES, load_digits_m_splits, load_digits_splits
from ssl_platform.data.digit_captions import BUILTIN_CAPTION_CORPORA
from ssl_platform.data.randomness import record_uniforms
from ssl_platform.data.transforms import (
    DRAWS,
    MultiViewAugment,
    OneViewAugment,
    augment_view,
    color_transform,
    finish_views,
    gaussian_blur,
    random_draws,
    random_resized_crop,
    random_solarize,
    to_float,
    view_draws,
)
from ssl_platform.probes import knn_accuracy
from ssl_platform.views import AugmentConfig, recipe


@pytest.fixture(scope="module")
def digits():
    return load_digits_splits(image_size=32, val_fraction=0.2, seed=0)


def draws(b: int, seed: int = 0, **fixed: float) -> dict[str, torch.Tensor]:
    """Random draws for a batch of b, with some names pinned to a value for every image."""
    r = random_draws(b, torch.Generator().manual_seed(seed))
    return {**r, **{k: torch.full((b,), float(v)) for k, v in fixed.items()}}


def colour_batch(n: int = 8, side: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"image": rng.integers(0, 256, size=(n, 3, side, side), dtype=np.uint8),
            "path": np.array([f"img/{i}.jpg" for i in range(n)], dtype=object)}


def test_digits_corpus_splits(digits):
    train, val = digits["train"], digits["val"]
    assert train.images.shape[1:] == (1, 32, 32) and train.images.dtype == np.uint8
    assert len(train) + len(val) == 1797 and len(val) == 360
    assert set(np.unique(val.labels)) == set(range(10))  # stratified
    again = load_digits_splits(image_size=32, val_fraction=0.2, seed=0)
    assert np.array_equal(again["val"].labels, val.labels)  # fixed seed -> same held-out set


def test_digits_m_is_digits_on_photos_fixed_by_the_seed_and_hard_for_raw_pixels(digits):
    m = load_digits_m_splits(image_size=32, val_fraction=0.2, seed=0)
    train, val = m["train"], m["val"]
    assert train.images.shape == (1437, 3, 32, 32) and train.images.dtype == np.uint8
    assert val.images.shape == (360, 3, 32, 32)
    # digits' split and labels, one photo patch per digit
    assert np.array_equal(val.labels, digits["val"].labels) and np.array_equal(train.labels, digits["train"].labels)
    assert train.class_names == digits["train"].class_names
    # colour: the channels differ (a grey image would have three equal planes)
    assert np.abs(val.images[:, 0].astype(int) - val.images[:, 1].astype(int)).mean() > 5
    again = load_digits_m_splits(image_size=32, val_fraction=0.2, seed=0)
    assert np.array_equal(again["train"].images, train.images) and np.array_equal(again["val"].images, val.images)
    other = load_digits_m_splits(image_size=32, val_fraction=0.2, seed=1)
    assert not np.array_equal(other["val"].images[:10], val.images[:10])
    assert load_digits_m_splits(image_size=24)["val"].images.shape == (360, 3, 24, 24)

    def raw_knn(split):  # kNN on raw pixels: what the corpus is built to defeat
        flat = {k: s.images.reshape(len(s), -1).astype(np.float32) / 255 for k, s in split.items()}
        return knn_accuracy(flat["train"], split["train"].labels, flat["val"], split["val"].labels, k=20)

    assert raw_knn(digits) > 0.9 and raw_knn(m) < 0.45


def test_digits_m_captions_pair_digits_m_images_with_their_digit():
    images = load_digits_m_splits(image_size=16)
    captions = BUILTIN_CAPTION_CORPORA["digits-m-captions"](image_size=16)
    for name in ("train", "val"):
        assert np.array_equal(captions[name].images, images[name].images)
        for label, caption in zip(captions[name].labels[:50], captions[name].captions[:50], strict=True):
            assert DIGIT_NAMES[label] in caption or str(label) in caption


def test_two_views_shapes_and_independence(digits):
    out = MultiViewAugment(2 * [AugmentConfig(size=24, flip_prob=0.5)], seed=1)({"image": digits["train"].images[:64],
                                                                        "label": digits["train"].labels[:64]})
    assert set(out) == {"view1", "view2"}  # labels never reach the pretraining batch
    for v in out.values():
        assert v.shape == (64, 1, 24, 24) and v.dtype == np.uint8  # a quarter of float32's bytes
        assert v.max() > 128  # the digits' ink survives the crop and the jitter
    assert not np.allclose(out["view1"], out["view2"])
    colour = MultiViewAugment(recipe("simclr", size=16), seed=0)(colour_batch())
    assert colour["view1"].shape == (8, 3, 16, 16)
    assert all(not np.allclose(colour["view1"][i], colour["view2"][i]) for i in range(8))  # per image


def test_seeded_augment_is_reproducible_and_unseeded_differs(digits):
    batch = {"image": digits["train"].images[:16]}
    a = MultiViewAugment(2 * [AugmentConfig()], seed=3)(batch)
    b = MultiViewAugment(2 * [AugmentConfig()], seed=3)(batch)
    c = MultiViewAugment(2 * [AugmentConfig()])(batch)
    d = MultiViewAugment(2 * [AugmentConfig()])(batch)
    assert np.array_equal(a["view1"], b["view1"])
    assert not np.array_equal(c["view1"], d["view1"])


def test_same_seed_and_epoch_give_same_views_whatever_the_batching():
    batch = colour_batch(8)
    augment = MultiViewAugment(recipe("byol", size=16), seed=7, epoch=2)
    whole = augment(batch)
    halves = [augment({k: v[s] for k, v in batch.items()}) for s in (slice(0, 4), slice(4, 8))]
    shuffled_order = np.array([5, 1, 7, 3, 0, 6, 2, 4])
    shuffled = augment({k: v[shuffled_order] for k, v in batch.items()})
    for view in ("view1", "view2"):
        assert np.allclose(whole[view], np.concatenate([h[view] for h in halves]), atol=1e-6)
        assert np.allclose(whole[view][shuffled_order], shuffled[view], atol=1e-6)


def test_the_fine_tune_view_is_a_crop_of_each_labelled_image_fixed_per_record():
    """`sslp finetune`'s augmentation: one crop per image, labels kept, the same crop for a record
    however it is batched, another one in another epoch."""
    batch = {**colour_batch(8), "label": np.arange(8)}
    crops = OneViewAugment(AugmentConfig(size=16, crop_scale_min=0.5, flip_prob=0.0, jitter_prob=0.0,
                                         grayscale_prob=0.0, blur_prob=0.0), seed=3)
    out = crops(batch)
    assert set(out) == {"image", "label"} and out["image"].shape == (8, 3, 16, 16)
    assert out["label"].tolist() == list(range(8))
    half = crops({k: v[4:] for k, v in batch.items()})
    np.testing.assert_allclose(out["image"][4:], half["image"], atol=1e-6)
    assert not np.allclose(out["image"], to_float(batch["image"]).numpy(), atol=1e-3)  # cropped
    crops.epoch = 1
    assert not np.allclose(crops(batch)["image"], out["image"], atol=1e-3)


def test_other_epoch_or_seed_gives_other_views_and_epoch_column_overrides():
    batch = colour_batch(8)
    base = MultiViewAugment(recipe("simclr", size=16), seed=7, epoch=0)(batch)
    next_epoch = MultiViewAugment(recipe("simclr", size=16), seed=7, epoch=1)(batch)
    other_seed = MultiViewAugment(recipe("simclr", size=16), seed=8, epoch=0)(batch)
    for other in (next_epoch, other_seed):
        assert all(not np.allclose(base["view1"][i], other["view1"][i]) for i in range(8))
    by_column = MultiViewAugment(recipe("simclr", size=16), seed=7, epoch=0)({**batch, "epoch": np.ones(8, np.int64)})
    assert np.array_equal(by_column["view1"], next_epoch["view1"])
    by_key = MultiViewAugment(recipe("simclr", size=16), seed=7)({"image": batch["image"], "key": batch["path"]})
    assert np.array_equal(by_key["view2"], base["view2"])  # "key" stands in for "path"


def test_record_uniforms_are_uniform_and_keyed():
    keys = [f"k{i}" for i in range(4000)]
    u = record_uniforms(keys, n=6, seed=0)
    assert u.shape == (4000, 6) and u.dtype == torch.float32 and u.min() >= 0 and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.std().item() - 12 ** -0.5) < 0.01
    assert abs(np.corrcoef(u[:, 0], u[:, 1])[0, 1]) < 0.05  # draws of one record are independent
    assert torch.equal(record_uniforms(keys[10:20], n=6, seed=0), u[10:20])
    assert not torch.equal(record_uniforms(keys[:5], n=6, seed=None), record_uniforms(keys[:5], n=6, seed=None))


def test_recipes_are_the_papers_defaults():
    s1, s2 = recipe("simclr")
    assert s1 == s2 and s1.crop_scale_min == 0.08 and s1.flip_prob == 0.5
    assert (s1.jitter_strength, s1.jitter_prob, s1.grayscale_prob, s1.blur_prob, s1.solarize_prob) == (1.0, 0.8, 0.2,
                                                                                                       0.5, 0)
    b1, b2 = recipe("byol", size=64, flip_prob=0.0)
    assert (b1.blur_prob, b1.solarize_prob, b2.blur_prob, b2.solarize_prob) == (1.0, 0.0, 0.1, 0.2)
    strengths = [b1.jitter_strength * a for a in (b1.jitter_brightness, b1.jitter_contrast, b1.jitter_saturation,
                                                  b1.jitter_hue)]
    assert np.allclose(strengths, [0.4, 0.4, 0.2, 0.1])  # BYOL table 6
    assert b1.size == b2.size == 64 and b1.flip_prob == b2.flip_prob == 0.0  # overrides reach both views
    assert recipe("barlow_twins") == recipe("vicreg") == recipe("byol")
    with pytest.raises(ValueError, match="no augmentation recipe for method 'mae'"):
        recipe("mae")
    with pytest.raises(ValueError, match=r"unknown augmentation setting.*blur"):
        recipe("simclr", blur=0.3)
    with pytest.raises(ValueError, match="blur_prob is a probability"):
        AugmentConfig(blur_prob=1.5)


def test_byol_second_view_solarizes_sometimes_first_never():
    n = 600
    white = {"image": np.full((n, 3, 8, 8), 255, np.uint8), "id": np.arange(n)}
    out = MultiViewAugment(recipe("byol", size=8), seed=0)(white)
    # Jitter keeps a white image >= 0.6 of full scale; solarizing maps it to <= 0.4.
    solarized = {v: (out[v].mean(axis=(1, 2, 3)) < 127.5).mean() for v in ("view1", "view2")}
    assert solarized["view1"] == 0
    assert 0.15 < solarized["view2"] < 0.25


def test_blur_probability_is_per_record():
    n = 800
    x = torch.rand(n, 1, 16, 16)
    r = view_draws(record_uniforms(list(range(n)), n=len(DRAWS), seed=0))
    r["blur_sigma"] = torch.ones(n)  # the widest sigma: a sigma near 0.1 px leaves an image as it is
    for prob in (0.1, 1.0):
        changed = (gaussian_blur(x, prob, r) - x).abs().amax(dim=(1, 2, 3)) > 1e-4
        assert abs(changed.float().mean().item() - prob) < 0.04
    assert torch.equal(gaussian_blur(x, 0.0, r), x)


def test_full_crop_without_flip_keeps_the_image_and_flip_mirrors_it():
    full = dict(crop_area=1.0, crop_ratio=0.5, crop_x=0.5, crop_y=0.5)  # area 1, aspect 1, centred
    for side in (16, RESIZE_EACH_MIN_SIDE):  # both ways of cutting (sampled, resized per image)
        x = torch.randint(0, 256, (4, 3, side, side), dtype=torch.uint8)
        assert torch.equal(random_resized_crop(x, side, scale_min=0.5, flip_prob=0.0, r=draws(4, **full)), x)
        y = random_resized_crop(x, side, scale_min=0.2, flip_prob=0.0, r=draws(4, seed=1, flip=0.9))
        z = random_resized_crop(x, side, scale_min=0.2, flip_prob=1.0, r=draws(4, seed=1, flip=0.9))
        assert torch.equal(z, y.flip(-1))  # the flip is a mirror of the same crop


@pytest.mark.parametrize("side, size, channels", [(24, 24, 1), (32, 32, 3), (56, 56, 3), (224, 224, 3), (40, 32, 3),
                                                  (100, 64, 3), (64, 80, 1)])
def test_the_crop_is_torchvisions_resized_crop_of_the_drawn_box_either_way(side, size, channels):
    """Whichever way a view is cut (one grid_sample of the chunk for small views, F.interpolate per
    image from RESIZE_EACH_MIN_SIDE up), it is torchvision's resized_crop of the box the draws
    pick, mirrored where flipped: exactly for the uint8 resize, within 1 of 255 for the float
    sampling (the uint8 kernel's fixed-point weights round differently)."""
    from ssl_platform.data.augment import _resize_each, _sample_boxes, crop_boxes, quantize

    g = torch.Generator().manual_seed(side + size)
    images = torch.randint(0, 256, (32, channels, side, side), dtype=torch.uint8, generator=g)
    r = random_draws(32, g)
    boxes = crop_boxes(side, side, 0.08, 1.0, r)
    flip = r["flip"] < 0.5
    x0, y0, w, h = (b.tolist() for b in boxes)
    assert min(w) >= 1 and min(h) >= 1 and all(a + b <= side for a, b in zip(x0 + y0, w + h, strict=True))
    expected = torch.stack([TF.resized_crop(images[i], y0[i], x0[i], h[i], w[i], [size, size], antialias=False)
                            for i in range(32)])
    expected = torch.where(flip[:, None, None, None], expected.flip(-1), expected)
    assert torch.equal(_resize_each(images, boxes, flip, size), expected)
    sampled = quantize(_sample_boxes(images.float().mul_(1 / 255.0), boxes, flip, size))
    assert (sampled.int() - expected.int()).abs().max() <= 1
    assert torch.equal(random_resized_crop(images, size, 0.08, 0.5, r), expected if size >= RESIZE_EACH_MIN_SIDE
                       else sampled)


def test_colour_matrix_matches_torchvision_brightness_contrast_saturation():
    x = torch.rand(6, 3, 8, 8)
    cfg = AugmentConfig(jitter_strength=1.0, jitter_prob=1.0, grayscale_prob=0.0)
    # Factors below 1 keep every intermediate inside [0, 1], so torchvision's per-step clamps do not bite.
    r = draws(6, jitter=0.0, brightness=0.3, contrast=0.2, saturation=0.1, hue=0.5, gray=0.9)
    b, c, s = (1 - 0.8 + 1.6 * v for v in (0.3, 0.2, 0.1))
    expected = TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(x, b), c), s)
    assert torch.allclose(color_transform(x, cfg, r), expected, atol=5e-4)  # torchvision's luma has 0.2989 for red
    off = AugmentConfig(jitter_prob=0.0, grayscale_prob=0.0)
    assert torch.allclose(color_transform(x, off, draws(6)), x, atol=1e-5)
    assert not torch.allclose(color_transform(x, cfg, draws(6)), x, atol=1e-2)
    gray_in = torch.rand(6, 1, 8, 8)
    assert torch.allclose(color_transform(gray_in, off, draws(6)), gray_in, atol=1e-6)
    assert not torch.allclose(color_transform(gray_in, cfg, draws(6)), gray_in, atol=1e-2)


def test_hue_turns_colours_but_keeps_greys_and_luma():
    x = torch.rand(6, 3, 8, 8) * 0.2 + 0.4  # weak colours: turning them never leaves [0, 1]
    grey = x[:, :1].expand(-1, 3, -1, -1)
    cfg = AugmentConfig(jitter_strength=1.0, jitter_prob=1.0, grayscale_prob=0.0, jitter_hue=0.5)
    r = draws(6, brightness=0.5, contrast=0.5, saturation=0.5, hue=0.9)  # hue only: +0.4 of a turn
    turned = color_transform(x, cfg, r)
    assert not torch.allclose(turned, x, atol=1e-2)
    assert torch.allclose(color_transform(grey, cfg, r), grey, atol=1e-5)
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    assert torch.allclose((turned * luma).sum(1), (x * luma).sum(1), atol=1e-4)


def test_grayscale_only_touches_colour_images():
    cfg = AugmentConfig(jitter_prob=0.0, grayscale_prob=1.0)
    gray = color_transform(torch.rand(6, 3, 4, 4), cfg, draws(6))
    assert torch.allclose(gray[:, 0], gray[:, 1], atol=1e-6) and torch.allclose(gray[:, 1], gray[:, 2], atol=1e-6)
    one = torch.rand(6, 1, 4, 4)
    assert torch.allclose(color_transform(one, cfg, draws(6)), one)


def test_blur_smooths_and_keeps_mean():
    x = torch.rand(4, 1, 32, 32)
    y = gaussian_blur(x, prob=1.0, r=draws(4))
    assert y.shape == x.shape
    assert torch.allclose(y.mean(), x.mean(), atol=0.02)
    assert y.diff(dim=-1).abs().mean() < x.diff(dim=-1).abs().mean()  # fewer sharp edges


@pytest.mark.parametrize("side", [16, 32, 48, 64, 80])  # radius 1, 1, 2, 3 (the shifted sums), 4 (the convolution)
def test_the_blur_of_small_images_is_the_grouped_convolutions(side, monkeypatch):
    """Small images are blurred by sums of shifted copies (faster there); every image drawn for
    blurring, colour and grey, must come out as the grouped convolution blurs it."""
    import ssl_platform.data.augment as augment

    for channels in (3, 1):
        x, r = torch.rand(6, channels, side, side), draws(6, seed=side)
        fast = gaussian_blur(x, prob=0.5, r=r)
        monkeypatch.setattr(augment, "SHIFTED_BLUR_RADIUS", 0)
        conv = gaussian_blur(x, prob=0.5, r=r)
        monkeypatch.undo()
        assert not torch.equal(fast, x) and torch.allclose(fast, conv, atol=1e-6, rtol=0)


def test_solarize_inverts_bright_pixels_of_chosen_images():
    x = torch.tensor([0.2, 0.7]).view(1, 1, 1, 2).repeat(2, 1, 1, 1)
    y = random_solarize(x.clone(), 0.5, {"solarize": torch.tensor([0.1, 0.9])})
    assert torch.allclose(y[0].flatten(), torch.tensor([0.2, 0.3])) and torch.equal(y[1], x[1])


def test_augment_view_takes_a_generator_or_draws():
    images = torch.from_numpy(colour_batch(4)["image"])
    cfg = recipe("simclr", size=8)[0]
    u = torch.rand(4, len(DRAWS), generator=torch.Generator().manual_seed(0))
    via_generator = augment_view(images, cfg, torch.Generator().manual_seed(0))
    assert torch.allclose(via_generator, augment_view(images, cfg, u))


def test_to_float_matches_augment_normalisation():
    img = np.full((2, 1, 4, 4), 255, np.uint8)
    assert torch.allclose(to_float(img), torch.ones(2, 1, 4, 4))


def test_rejects_non_image_batches_and_bad_configs():
    with pytest.raises(ValueError, match="uint8 images"):
        MultiViewAugment(2 * [AugmentConfig()])({"image": np.zeros((2, 8, 8), np.float32)})
    with pytest.raises(ValueError, match="one per view"):
        MultiViewAugment([])
    with pytest.raises(ValueError, match="min <= max"):
        AugmentConfig(crop_scale_min=0.5, crop_scale_max=0.4)
    with pytest.raises(ValueError, match=r"raise data\.image_size"):
        recipe([{"size_frac": 0.2}], size=32)  # a 6-pixel view
    with pytest.raises(ValueError, match="unknown augmentation setting"):
        recipe([{"crop_scale": 0.5}])


def test_views_augmented_on_the_device_equal_the_cpu_ones():
    """data.augment_on=device: the CPU workers ship uint8 crops and each view's draws; the train
    worker's finish_views runs colour, grayscale, blur and solarize there. Same views, bit for bit."""
    views = recipe("byol", size=16)  # jitter, grayscale, blur and BYOL's solarize all in play
    batch = colour_batch(16)
    on_cpu = MultiViewAugment(views, seed=3)(batch)
    shipped = MultiViewAugment(views, seed=3, placement="device")(batch)
    assert set(shipped) == {"view1", "view1_draws", "view2", "view2_draws"}
    assert shipped["view1"].dtype == np.uint8 and shipped["view1_draws"].shape == (16, len(DRAWS))
    assert not np.array_equal(shipped["view2"], on_cpu["view2"])  # the crops alone: colour still to come
    tensors = lambda b: {k: torch.from_numpy(v) for k, v in b.items()}  # noqa: E731
    finished, reference = finish_views(tensors(shipped), views), finish_views(tensors(on_cpu), ())
    assert set(finished) == {"view1", "view2"}
    for key, x in finished.items():
        assert x.dtype == torch.float32 and torch.equal(x, reference[key])
        assert x.min() >= -1.0 and x.max() <= 1.0  # normalised as to_float does
    with pytest.raises(ValueError, match="placement='gpu'"):
        MultiViewAugment(views, placement="gpu")


def test_views_at_224_px_are_the_same_in_any_batch_and_on_either_side():
    """At 224 px a batch's images are augmented in chunks of a few (transforms.CHUNK_VALUES: the
    ops are memory-bound) and the blur's radius is a function of the side alone (it was the
    batch's largest sigma's, so an image's blur depended on the others beside it: on the number
    of workers, and on where the colour ops ran). Every record's views are the same, byte for
    byte, made in a 12-image batch, one by one, or finished on the device in other batches."""
    from ssl_platform.data.transforms import CHUNK_VALUES

    views = recipe("simclr", size=224)  # blur with probability 0.5, sigma up to 2 px
    batch = colour_batch(12, side=256)
    assert CHUNK_VALUES // (3 * 256 * 256) < 12  # the batch is made in more than one chunk
    augment = MultiViewAugment(views, seed=5)
    whole = augment(batch)
    one_by_one = [augment({k: v[i:i + 1] for k, v in batch.items()}) for i in range(12)]
    blurred = record_uniforms(batch["path"], 2 * len(DRAWS), 5)[:, DRAWS.index("blur")] < views[0].blur_prob
    assert 0 < blurred.sum() < 12  # some images blurred, each with its own sigma
    shipped = MultiViewAugment(views, seed=5, placement="device")(batch)
    tensors = lambda b, s: {k: torch.from_numpy(v[s]) for k, v in b.items()}  # noqa: E731
    on_device = [finish_views(tensors(shipped, s), views) for s in (slice(0, 7), slice(7, 12))]
    for key in ("view1", "view2"):
        assert whole[key].shape == (12, 3, 224, 224)
        assert np.array_equal(whole[key], np.concatenate([v[key] for v in one_by_one]))
        finished = torch.cat([v[key] for v in on_device])
        assert torch.equal(finished, finish_views(tensors(whole, slice(None)), ())[key])


MULTI_CROP = ({"crop_scale_min": 0.4}, {"crop_scale_min": 0.4},
              {"size_frac": 0.5, "crop_scale_min": 0.05, "crop_scale_max": 0.4},
              {"size_frac": 0.5, "crop_scale_min": 0.05, "crop_scale_max": 0.4})


def test_multi_crop_views_have_their_own_sizes_and_keep_the_global_views_draws():
    """2 global + 2 local views: one key per view at its own side; views 1-2 are exactly the
    two-view transform's (view i draws its own block of each record's uniforms)."""
    views = recipe(MULTI_CROP, size=16, crop_scale_min=0.6)
    assert [v.size for v in views] == [16, 16, 8, 8]
    assert [v.crop_scale_min for v in views] == [0.6, 0.6, 0.05, 0.05]  # data.crop_scale_min: global views only
    batch = colour_batch(8)
    out = MultiViewAugment(views, seed=5)(batch)
    assert [out[f"view{i}"].shape for i in range(1, 5)] == [(8, 3, 16, 16)] * 2 + [(8, 3, 8, 8)] * 2
    two = MultiViewAugment(views[:2], seed=5)(batch)
    assert set(two) == {"view1", "view2"}
    assert all(np.array_equal(out[k], two[k]) for k in two)
    one = MultiViewAugment(views[:1], seed=5)(batch)  # a single view (a pretext task's batch)
    assert set(one) == {"view1"} and np.array_equal(one["view1"], out["view1"])


def test_local_crops_cover_a_small_part_of_the_image():
    """crop_scale_max bounds the crop's area: a local view of a half-black, half-white image is
    far more often all one colour than a global view of it."""
    image = np.zeros((256, 1, 32, 32), np.uint8)
    image[:, :, :, 16:] = 255
    plain = {"flip_prob": 0.0, "jitter_prob": 0.0, "blur_prob": 0.0}
    views = recipe([{**plain, "crop_scale_min": 0.9}, {**plain, "crop_scale_min": 0.02, "crop_scale_max": 0.05}],
                   size=32)
    out = MultiViewAugment(views, seed=0)({"image": image})
    spread = {k: (v.max(axis=(1, 2, 3)) - v.min(axis=(1, 2, 3))) for k, v in out.items()}  # (B,) per view
    assert (spread["view1"] > 1.5).all()  # every global crop sees both halves
    assert (spread["view2"] < 0.5).mean() > 0.5  # most local crops see one half only


def test_bench_smoke(ray_session):
    rows = run_data_bench(sizes=(16,), images=48, batch_size=16, cpus=1, repeats=1)
    assert len(rows) == 1 and rows[0]["size"] == 16 and rows[0]["images"] == 48
    for key in ("baseline_views_per_s", "platform_views_per_s", "baseline_core_views_per_s",
                "platform_core_views_per_s", "ratio", "core_ratio", "ray_defaults_views_per_s", "efficiency",
                "ray_defaults_efficiency", "parallel_core_views_per_s", "machine_efficiency",
                "platform_long_views_per_s", "long_efficiency", "long_machine_efficiency"):
        assert rows[0][key] > 0
    # The long pass: the 48 images repeated to at least LONG_PASS_BATCHES batches of 16 (11 x 48 = 528).
    assert rows[0]["long_pass_images"] == 528 >= LONG_PASS_BATCHES * 16
    table = format_bench(rows)
    assert "platform (Ray Data)" in table and "long pass" in table and "16" in table


def test_the_long_pass_reads_the_images_as_often_as_it_is_told(ray_session):
    from ssl_platform.bench import BenchCase, platform_ray_pass, synthetic_jpegs

    case = BenchCase(size=16, images=12, batch_size=4, cpus=1)
    blobs = synthetic_jpegs(12, 16)
    for copies in (1, 3):
        views, seconds = platform_ray_pass(blobs, case, copies=copies)()
        assert views == 2 * 12 * copies and seconds > 0  # two views of every image, every time it comes


@pytest.mark.parametrize("args, flag", [(["--sizes", "32", "4"], "--sizes 4"), (["--images", "0"], "--images"),
                                        (["--batch-size", "0"], "--batch-size"), (["--repeats", "0"], "--repeats")])
def test_bench_data_refuses_what_it_cannot_run_naming_the_flag(args, flag):
    """Before any image is made or Ray starts (a 4-px view failed inside a Ray task, naming a config key)."""
    from ssl_platform import cli

    with pytest.raises(SystemExit, match=f"^{flag}"):
        cli.main(["bench", "data", *args])


def test_bench_train_reads_a_presets_builtin_corpus_as_the_run_does(ray_session, tmp_path):
    """The corpus ``sslp bench train`` times is the run's own: GPT's token blocks and BERT's masked
    pairs (a transform that reads the whole table by id) from python-docs."""
    from ssl_platform.bench_train import builtin_corpus
    from ssl_platform.config import load_config

    corpus = builtin_corpus(load_config("gpt-python-docs", ["data.max_len=32", "data.vocab_size=300"]), tmp_path / "g")
    rows = corpus.rows(slice(0, 4))
    assert rows["input_ids"].shape == (4, 32) and rows["input_ids"].max() < 300
    bert = builtin_corpus(load_config("bert-python-docs", ["data.max_len=32", "data.vocab_size=300"]), tmp_path / "b")
    rows = bert.rows(slice(2, 6))
    assert rows["input_ids"].shape == (4, 32) and {"mlm_labels", "nsp_labels"} <= set(rows)


def test_bench_train_pieces_measure_the_same_model_and_refuse_other_kinds():
    """``sslp bench train``'s compute bound and plain DataLoader loop on a tiny SimCLR (torchvision's
    per-image transforms) and a tiny CPC (the corpus's own transform per record); the third figure
    is ``sslp run`` itself, tested end to end elsewhere. A preset on data.path is refused."""
    from ssl_platform.bench_train import Corpus, compute_bound, format_train_bench, plain_loop, run_train_bench
    from ssl_platform.config import load_config
    from ssl_platform.data.audio import AudioCrops
    from ssl_platform.data.builtin import load_image_corpus
    from ssl_platform.methods import method_spec
    from ssl_platform.views import image_views

    small = ["data.image_size=16", "model.encoder_widths=[4,8]", "model.projector_width=16", "model.projector_dim=8",
             "train.batch_size=16"]
    cfg = load_config("simclr-digits", small)
    images = load_image_corpus("digits", 16, 0.2, 0)["train"].images[:64]
    views = MultiViewAugment(image_views(cfg, method_spec("simclr").views), seed=0)
    corpus = Corpus({"image": images}, views)
    assert set(corpus.rows(slice(0, 4))) == {"view1", "view2"}
    assert compute_bound(cfg, corpus, steps=2, cpus=1) > 0
    assert plain_loop(cfg, corpus, steps=2, cpus=1) > 0
    cpc = load_config("cpc-spoken-digits", ["train.batch_size=8", "data.crop_seconds=0.25"])
    clips = np.empty(16, dtype=object)
    clips[:] = [np.random.default_rng(i).standard_normal(8000 + 100 * i).astype(np.float32) for i in range(16)]
    audio = Corpus({"audio": clips}, AudioCrops(0.25, cpc.data.sample_rate, seed=0))
    assert compute_bound(cpc, audio, steps=2, cpus=1) > 0
    assert plain_loop(cpc, audio, steps=2, cpus=1) > 0
    with pytest.raises(SystemExit, match=r"leave data\.path unset"):
        run_train_bench("simclr-digits", steps=2, cpus=1, overrides=["data.path=/nowhere", "data.kind=image",
                                                                      "eval.enabled=false", "eval.online_every=0"])
    # A GPU measurement on a machine without a GPU stops before anything is measured, saying what to drop.
    assert not torch.cuda.is_available()
    with pytest.raises(SystemExit, match=r"scaling\.use_gpu=true, but torch sees no CUDA GPU.*drop the override"):
        run_train_bench("simclr-digits", steps=2, cpus=1, overrides=["scaling.use_gpu=true"])
    # train.precision=fp64: the bound trains the float64 model on float64 views, as the run would.
    assert compute_bound(load_config("simclr-digits", [*small, "train.precision=fp64"]), corpus, steps=2, cpus=1) > 0
    text = format_train_bench({"preset": "p", "steps": 2, "cpus": 1, "batch_size": 16, "load_avg_1m": 1.0,
                               "load_avg_1m_after": 1.0, "compute_bound_samples_per_s": 100.0,
                               "plain_loop_samples_per_s": 50.0, "sslp_run_samples_per_s": 75.0,
                               "sslp_run_data_wait": 0.1})
    assert "50%" in text and "75%" in text and "1.50x the plain loop" in text
