"""Omniglot data for ANML: download, preprocessing, caching and task sampling."""
from .omniglot import DataError, download_omniglot, load_omniglot, resolve_data_root
from .sampler import OmniSampler

__all__ = ["OmniSampler", "load_omniglot", "resolve_data_root", "download_omniglot", "DataError"]
