"""Hooks into other libraries' entry points. `transformers`: `ReamConfig` as a `quantization_config`.

Registering the quantizer needs transformers' quantizer registry (`transformers.quantizers.auto`), whose import
pulls in every quantizer transformers ships (about 0.8 s on top of torch and transformers). `import ream_hf` and
the CLI's `--help` should not pay that, and nothing needs the registration before transformers' own loading code
imports the registry (`modeling_utils` does, at its top). So `register_with_transformers` registers at once when
the registry is already imported, and otherwise when it is: a one-shot import hook runs our registration right
after the registry module has executed. Either way, once `ream_hf` is imported, `from_pretrained(...,
quantization_config=ReamConfig(...))` finds "ream".
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

REGISTRY_MODULE = "transformers.quantizers.auto"
QUANTIZER_MODULE = "ream_hf.integrations.transformers"  # registers "ream" when imported


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds the registry module through the other finders and wraps its loader so that our quantizer module
    is imported (and so registered) right after the registry has executed. Removes itself on first use."""

    def find_spec(self, fullname, path, target=None):
        if fullname != REGISTRY_MODULE:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            importlib.import_module(QUANTIZER_MODULE)

        spec.loader.exec_module = exec_then_register
        return spec


def register_with_transformers() -> None:
    """Make "ream" a transformers quantization method: now if transformers' quantizer registry is imported,
    else as soon as it is. Idempotent."""
    if REGISTRY_MODULE in sys.modules:
        importlib.import_module(QUANTIZER_MODULE)
    elif not any(isinstance(finder, _RegisterAfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
