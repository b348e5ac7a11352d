"""Loading user code named in a config: ``file.py:name`` or ``package.module:name``.

Configs name the model constructor, a custom loss, a setup hook and a text preprocess function
this way; both :mod:`indexer.config` and :mod:`indexer.data` load them, so the loader lives in
its own module that depends on neither.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

from indexer.errors import ConfigError


def load_entry(entry: str, field_name: str = "entry") -> Any:
    """Import ``file.py:name`` or ``package.module:name`` and return the attribute.

    A file is imported once per process under a private module name (its folder is put on
    ``sys.path`` so that it can import its neighbours). Failures raise a ConfigError naming
    ``field_name``.
    """
    mod_name, attr = entry.rsplit(":", 1)
    try:
        if mod_name.endswith(".py"):
            p = Path(mod_name)
            key = f"_gradindex_user_{abs(hash(str(p)))}"
            mod = sys.modules.get(key)
            if mod is None:
                spec = importlib.util.spec_from_file_location(key, p)
                mod = importlib.util.module_from_spec(spec)
                sys.modules[key] = mod
                if str(p.parent) not in sys.path:
                    sys.path.insert(0, str(p.parent))
                spec.loader.exec_module(mod)
        else:
            mod = importlib.import_module(mod_name)
        return getattr(mod, attr)
    except (ImportError, AttributeError, FileNotFoundError) as exc:
        raise ConfigError(field_name, f"cannot load {entry!r}: {exc}") from exc


__all__ = ["load_entry"]
