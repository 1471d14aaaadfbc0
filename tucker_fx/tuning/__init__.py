"""Choosing lowerings: measured timings (cached on disk) or, when tuning is off, a cost model."""

from tucker_fx.tuning.cache import TimingCache, default_cache_path, device_key
from tucker_fx.tuning.cost_model import direct_conv_seconds, fft_conv_seconds

__all__ = ["TimingCache", "default_cache_path", "device_key", "direct_conv_seconds", "fft_conv_seconds"]
