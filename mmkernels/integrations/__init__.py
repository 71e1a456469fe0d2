"""Integrations with other libraries. Each is a submodule that imports its library only when used,
so none of them is a dependency of mmkernels:

* :mod:`mmkernels.integrations.transformers` — Hugging Face transformers (>= 5):
  ``register()`` adds the experts implementation ``"mmkernels"`` (``moe.route`` + ``moe.experts``
  behind transformers' own routers), for ``from_pretrained(..., experts_implementation="mmkernels")``
  or ``model.set_experts_implementation("mmkernels")``.
"""
