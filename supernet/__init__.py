"""The superformer stage and the models. Importing it registers the timm models `vitas_vit`
(supernet.static) and `vitas_asvit` (supernet.asvit), and the As-ViT space kind
(`space.kind: asvit`, supernet.asvit_space) with `space_from_config`."""
from vitas.supernet import asvit_space, static  # noqa: F401  (registrations on import)
