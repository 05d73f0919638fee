"""cfg-serve: classifier-free guidance diffusion inference service."""

import logging

# diffusers imports torchao (the int8 extra, app/models/quantize.py) whenever it is installed, and a CPU build
# of torch makes that import log a warning for each of torchao's CUDA libraries, one for its Tensor subclasses,
# and torch's pytree deprecations of torchao's enums. None of it touches this project (int8 uses torch's own
# oneDNN kernels), so keep it out of the service's log; real errors still show.
for _name in ("torchao", "diffusers.quantizers.torchao.torchao_quantizer", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)
