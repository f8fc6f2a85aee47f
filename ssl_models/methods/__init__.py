"""Methods: an encoder, heads and an objective composed into one ``nn.Module`` each."""

from ssl_models.methods.barlow_twins import BarlowTwins
from ssl_models.methods.bert import BERT
from ssl_models.methods.byol import BYOL
from ssl_models.methods.clip import CLIP
from ssl_models.methods.cpc import CPC
from ssl_models.methods.dino import DINO
from ssl_models.methods.gpt import GPT
from ssl_models.methods.rotnet import RotNet
from ssl_models.methods.siglip import SigLIP
from ssl_models.methods.simclr import SimCLR
from ssl_models.methods.vicreg import VICReg

__all__ = ["BERT", "BYOL", "CLIP", "CPC", "DINO", "GPT", "BarlowTwins", "RotNet", "SigLIP", "SimCLR", "VICReg"]
