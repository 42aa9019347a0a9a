"""Everything grokviz reads from or writes to disk about a model's weights.

* :mod:`.names` — the one name table between the Grok-1 reference's parameter paths and grokviz's pytree;
* :mod:`.release` — the released Grok-1 format (pickles), read without executing anything from a file;
* :mod:`.safetensors_io` — safetensors files: streamed writing, validated headers, memory-mapped tensors;
* :mod:`.converted` — grokviz's own on-disk format (safetensors shards + index + ``config.json``), which the
  bundled tiny model, ``grokviz convert`` and ``grokviz train`` all write and ``gv.load(path)`` opens;
* :mod:`.config_io` — JSON (file, string, dict) to :class:`~grokviz.config.GrokConfig`;
* :mod:`.manifest` — SHA-256 manifests for folders whose format cannot check itself;
* :mod:`.fsutil` — atomic folder/file writes, crash-leftover recovery, paths confined to a folder;
* :mod:`.assemble` — stacking streamed tensors into the param pytree (on the host or onto a mesh).
"""

from .names import params_from_reference as params_from_reference
from .names import params_to_reference as params_to_reference
from .names import reference_paths as reference_paths
