"""Registered pruning methods: importing this package registers them all."""

from .base import ImageInputs, Method
from .cls import CLSConfig, VTCCLS
from .fastv import FastV, FastVConfig
from .random import RandomConfig, RandomPrune

__all__ = ["ImageInputs", "Method", "CLSConfig", "FastVConfig", "RandomConfig", "VTCCLS", "FastV", "RandomPrune"]
