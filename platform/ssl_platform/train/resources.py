"""Resource planning: how many train workers of what size a cluster fits (:func:`plan_workers`),
with the data pipeline's CPUs kept free, and waiting (bounded) for nodes the autoscaler adds and
for resources that other jobs hold, instead of letting Ray wait without a word.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import ray
import torch

from ssl_platform.config import ExperimentConfig, worker_counts
from ssl_platform.train.session import ResourceError

# Ray Train gives up placing the worker group after 60 s and tries again; bounded retries turn
# "the cluster stays busy" into an error instead of waiting forever.
PLACEMENT_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class WorkerPlan:
    num_workers: int  # the workers that must fit: the only count, or an elastic run's smallest
    cpus_per_worker: float
    use_gpu: bool
    sizes: tuple[int, ...] = ()  # an elastic run's worker counts, ascending (config.worker_counts); () when fixed

    def describe(self) -> str:
        if self.num_workers == 0:
            return f"local mode (this process{', on its GPU' if self.use_gpu else ''})"
        if self.sizes:
            counts = ", ".join(map(str, self.sizes[:-1])) + f" or {self.sizes[-1]}" if len(self.sizes) > 1 else (
                str(self.sizes[0]))
            return (f"elastic scaling.num_workers=[{self.sizes[0]}, {self.sizes[-1]}]: {counts} workers as the "
                    f"cluster holds them x {self.resources()}")
        return f"{self.num_workers} workers x {self.resources()}"

    def resources(self) -> dict[str, float]:
        res = {"CPU": self.cpus_per_worker}
        if self.use_gpu:
            res["GPU"] = 1
        return res


def plan_workers(cfg: ExperimentConfig, nodes: list[dict[str, float]]) -> WorkerPlan:
    """Size the train workers so the data pipeline always keeps ``scaling.data_cpus`` CPUs.

    ``nodes`` are the alive nodes' total resources. Ray Train workers hold their CPUs for the
    whole run; if they took every CPU, Ray Data could never schedule a transform and the run
    would hang, so an infeasible request is refused here, before anything is scheduled.
    """
    s = cfg.scaling
    if s.num_workers == 0:  # local mode: the driver is the only rank; Ray Data may use every CPU of the cluster
        if s.use_gpu and not torch.cuda.is_available():
            raise ResourceError("scaling.num_workers=0 trains in this process, which sees no GPU; set "
                                "scaling.use_gpu=false, or scaling.num_workers=1 to train on a GPU node of the cluster")
        return WorkerPlan(0, 0.0, s.use_gpu)
    counts = worker_counts(cfg)
    need = counts[0]  # an elastic run's smallest count must fit; Ray Train adds workers where there is room
    key = f"scaling.num_workers={s.num_workers}"
    total_cpu = sum(n.get("CPU", 0.0) for n in nodes)
    total_gpu = sum(n.get("GPU", 0.0) for n in nodes)
    if s.use_gpu and total_gpu < need:
        raise ResourceError(
            f"scaling.use_gpu=true needs {need} GPUs (one per worker) but the cluster has {total_gpu:g}; "
            + (f"set scaling.num_workers={int(total_gpu)}" + (" (or a range that starts there)" if s.elastic else "")
               + " or scaling.use_gpu=false" if total_gpu >= 1 else "set scaling.use_gpu=false")
        )
    free_for_train = total_cpu - s.data_cpus
    if s.cpus_per_worker is None:
        # One CPU each where there is room, else an equal fraction (e.g. 0.5 on a 2-core laptop); an
        # elastic run is sized for its smallest count, and more workers of that size run where they fit.
        cpus = min(1.0, math.floor(free_for_train / need * 100) / 100)
        if cpus < 0.05:
            raise ResourceError(
                f"the cluster has {total_cpu:g} CPUs: not enough for {need} train workers plus "
                f"scaling.data_cpus={s.data_cpus:g} for the data pipeline; lower {key} or "
                f"scaling.data_cpus"
            )
    else:
        cpus = s.cpus_per_worker
        if cpus * need > free_for_train + 1e-9:
            raise ResourceError(
                f"{need} workers x scaling.cpus_per_worker={cpus:g} + scaling.data_cpus={s.data_cpus:g} "
                f"exceeds the cluster's {total_cpu:g} CPUs; lower scaling.cpus_per_worker or {key}"
            )
    biggest = max((n.get("CPU", 0.0) for n in nodes if not s.use_gpu or n.get("GPU", 0) >= 1), default=0.0)
    if cpus > biggest:
        raise ResourceError(f"scaling.cpus_per_worker={cpus:g} does not fit on any node (largest has {biggest:g} CPUs)")
    if s.elastic and (room := workers_that_fit(nodes, cpus, s.use_gpu, s.data_cpus, need)) < need:
        raise ResourceError(f"{key} needs at least {need} workers of {cpus:g} CPUs, but the nodes hold {room} of them "
                            f"(with scaling.data_cpus={s.data_cpus:g} left for Ray Data); lower the range's minimum "
                            f"or scaling.cpus_per_worker")
    return WorkerPlan(need, cpus, s.use_gpu, tuple(counts) if s.elastic else ())


def workers_that_fit(nodes: list[dict[str, float]], cpus_per_worker: float, use_gpu: bool, data_cpus: float,
                     cap: int) -> int:
    """How many train workers of ``cpus_per_worker`` CPUs (and a GPU each with ``use_gpu``) the
    ``nodes`` (their total resources) hold with ``data_cpus`` CPUs left for Ray Data, at most
    ``cap``: what fits node by node, and no more than the CPUs beyond the data's allow."""
    def fit(have: float, each: float) -> int:
        return cap if each <= 0 else math.floor(have / each + 1e-9)

    per_node = sum(min(fit(n.get("CPU", 0.0), cpus_per_worker), fit(n.get("GPU", 0.0), 1.0) if use_gpu else cap)
                   for n in nodes)
    beside_data = fit(sum(n.get("CPU", 0.0) for n in nodes) - data_cpus, cpus_per_worker)
    return max(0, min(per_node, beside_data, cap))


def alive_nodes() -> list[dict[str, float]]:
    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


def worker_bundles(cfg: ExperimentConfig) -> list[dict[str, float]]:
    """What a run asks of the cluster: one bundle per train worker plus the data pipeline's CPUs."""
    s = cfg.scaling
    worker = {"CPU": s.cpus_per_worker if s.cpus_per_worker is not None else 1.0, **({"GPU": 1.0} if s.use_gpu else {})}
    return [dict(worker) for _ in range(worker_counts(cfg)[-1])] + ([{"CPU": s.data_cpus}] if s.data_cpus else [])


def _request_resources(bundles: list[dict[str, float]]) -> None:
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=bundles)


PROGRESS_EVERY_S = 60.0  # while the autoscaler works: a line this often, and whenever a node arrives


def _have(nodes: list[dict[str, float]], want: dict[str, float]) -> str:
    """``"8 of 16 GPUs, 96 of 96 CPUs"``: what the alive nodes hold of what the run asked for."""
    return ", ".join(f"{sum(n.get(k, 0.0) for n in nodes):g} of {want[k]:g} {k}s" for k in ("GPU", "CPU") if want[k])


def _bundles_text(cfg: ExperimentConfig) -> str:
    s = cfg.scaling
    worker = f"CPU {s.cpus_per_worker if s.cpus_per_worker is not None else 1.0:g}" + (", GPU 1" if s.use_gpu else "")
    data = f" + {s.data_cpus:g} CPUs for Ray Data" if s.data_cpus else ""
    return f"{worker_counts(cfg)[-1]} train workers x {{{worker}}}{data}"


def cluster_nodes(cfg: ExperimentConfig, nodes=alive_nodes, request=_request_resources, sleep=time.sleep,
                  clock=time.monotonic) -> list[dict[str, float]]:
    """The nodes to plan the train workers on.

    With ``scaling.autoscale`` the cluster may start without the nodes a run needs (a GPU worker
    group that scales from 0), and :func:`plan_workers` would refuse it. Nothing asks the
    autoscaler for nodes before Ray Train's placement group exists, so the run asks for its
    bundles itself (``ray.autoscaler.sdk.request_resources``), waits at most
    ``scaling.wait_for_resources_s`` for a cluster that :func:`plan_workers` accepts, then
    withdraws the request: the placement group holds the nodes from there on (and is itself the
    demand that brings a lost node back).
    """
    if not cfg.scaling.autoscale:
        return nodes()
    timeout = cfg.scaling.wait_for_resources_s
    bundles = worker_bundles(cfg)
    want = {k: sum(b.get(k, 0.0) for b in bundles) for k in ("CPU", "GPU")}
    start = clock()
    deadline = start + timeout
    request(bundles)
    last_said, said_at = None, start
    try:
        while True:
            current = nodes()
            try:
                plan_workers(cfg, current)
                return current
            except ResourceError as e:
                if clock() >= deadline:
                    raise ResourceError(
                        f"{e} (the autoscaler did not add the nodes within scaling.wait_for_resources_s={timeout:g} s: "
                        f"check the worker group's max_workers / maxReplicas and `ray status`)") from None
            have = _have(current, want)
            if last_said is None:
                print(f"asked the autoscaler for {want['CPU']:g} CPUs and {want['GPU']:g} GPUs "
                      f"({_bundles_text(cfg)}); waiting up to {timeout:g} s for the nodes "
                      f"(scaling.wait_for_resources_s); the cluster has {have}", flush=True)
                last_said = have
            elif have != last_said or clock() - said_at >= PROGRESS_EVERY_S:
                print(f"still waiting for the autoscaler ({clock() - start:.0f} of {timeout:g} s): the cluster has "
                      f"{have}", flush=True)
                last_said, said_at = have, clock()
            sleep(min(5.0, max(deadline - clock(), 0.0)))
    finally:
        request([])


def wait_for_free_resources(plan: WorkerPlan, data_cpus: float, timeout_s: float, free=None,
                            sleep=time.sleep, clock=time.monotonic) -> None:
    """Wait until the cluster has the plan's resources free, at most ``timeout_s`` seconds.

    :func:`plan_workers` checks the cluster's *total* resources; on a shared cluster other jobs
    may hold them. Ray would wait for them without a word, so the driver says what it waits
    for and gives up with a :class:`ResourceError` after the timeout. ``free`` (default
    ``ray.available_resources``) returns the cluster's free resources.
    """
    free = free or ray.available_resources
    need = {"CPU": plan.num_workers * plan.cpus_per_worker + data_cpus,
            "GPU": plan.num_workers if plan.use_gpu else 0}  # local mode: the driver's own GPU is not Ray's
    deadline = clock() + timeout_s
    announced = False
    while True:
        have = free()
        short = {k: v for k, v in need.items() if v and have.get(k, 0.0) + 1e-9 < v}
        if not short:
            return
        held = ", ".join(f"{k} {need[k]:g} needed, {have.get(k, 0.0):g} free" for k in short)
        if clock() >= deadline:
            raise ResourceError(
                f"other jobs hold the resources this run needs ({held}) and did not release them within "
                f"scaling.wait_for_resources_s={timeout_s:g} s; wait for them, raise that timeout, "
                f"or lower scaling.num_workers / scaling.cpus_per_worker / scaling.data_cpus"
            )
        if not announced:
            print(f"waiting up to {timeout_s:g} s for resources held by other jobs ({held})", flush=True)
            announced = True
        sleep(min(2.0, max(deadline - clock(), 0.0)))
