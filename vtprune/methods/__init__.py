"""Registered pruning methods: importing this package registers them all."""

from .base import ImageInputs, Method
from .cdpruner import CDPruner, CDPrunerConfig
from .cls import CLSConfig, VTCCLS
from .dart import DART, DARTConfig
from .divprune import DivPrune, DivPruneConfig
from .fastv import FastV, FastVConfig
from .pact import PACT, PACTConfig
from .pool import Pool, PoolConfig
from .pdrop import PDrop, PDropConfig
from .random import RandomConfig, RandomPrune
from .sparsevlm import SparseVLM, SparseVLMConfig
from .todre import ToDRE, ToDREConfig
from .visionzip import VisionZip, VisionZipConfig
from .vispruner import VisPruner, VisPrunerConfig
from .zoo import ZOOConfig, ZOOPrune

__all__ = [
    "ImageInputs", "Method", "CLSConfig", "DARTConfig", "DivPruneConfig", "FastVConfig", "RandomConfig",
    "VTCCLS", "DART", "DivPrune", "FastV", "RandomPrune", "ZOOConfig", "ZOOPrune",
    "ToDREConfig", "ToDRE", "VisionZipConfig", "VisionZip", "PACTConfig", "PACT",
    "VisPrunerConfig", "VisPruner", "CDPrunerConfig", "CDPruner", "PoolConfig", "Pool",
    "PDropConfig", "PDrop", "SparseVLMConfig", "SparseVLM",
]
