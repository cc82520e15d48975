"""The superformer stage. Importing it registers the timm model `vitas_vit` (supernet.static)."""
from vitas.supernet import static  # noqa: F401  (registers vitas_vit with timm)
