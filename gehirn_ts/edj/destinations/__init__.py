"""Destinations: one class per kind, built from a URL by ``edj.registry``."""
