"""EM-DPO on Hugging Face causal language models (the optional extra ``emdpo-core[hf]``).

Data: ranked rows (``prompt``, ``responses`` best first, optional ``n_ranked`` and
``annotator``), checked by :func:`validate_ranked_rows`, converted from TRL's pairwise rows
(:func:`from_pairwise`) or per-response scores (:func:`from_scores`). Batches:
:class:`RankedListCollator` (padded, or one packed sequence per list with the prompt encoded
once: ``prefix_sharing=True``). Log-probabilities: :func:`sequence_logps`. Training:
``EMDPOConfig`` and ``EMDPOTrainer``.

``import emdpo_core`` never imports this package; importing it imports torch (and the
trainer names import transformers, peft and trl when first used).
"""

from __future__ import annotations

import importlib
import importlib.util

from .collator import RankedListCollator
from .data import NoAnnotatorWarning, from_pairwise, from_scores, validate_ranked_rows
from .logps import (prefix_sharing_mask, resolve_layout, sequence_logps,
                    supports_prefix_sharing, token_logps)

# Names defined in submodules that import transformers/peft/trl: loaded on first access.
_LAZY = {
    "EMDPOConfig": ".config",
    "EMDPOTrainer": ".trainer",
    "MixtureLM": ".aggregate",
}

__all__ = [
    "validate_ranked_rows",
    "from_pairwise",
    "from_scores",
    "NoAnnotatorWarning",
    "RankedListCollator",
    "sequence_logps",
    "token_logps",
    "supports_prefix_sharing",
    "resolve_layout",
    "prefix_sharing_mask",
]
# The lazy names join __all__ once their module is in the package.
__all__ += [n for n, mod in _LAZY.items()
            if importlib.util.find_spec(mod, __name__) is not None]


def __getattr__(name):
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name], __name__)
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
