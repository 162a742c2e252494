"""lt_zoo: long-tailed image classification methods as ordinary timm models.

``import lt_zoo`` registers every lt_zoo architecture with timm (timm has no plugin
discovery, so the import is required before ``timm.create_model``).
"""
__version__ = "0.1.0"
