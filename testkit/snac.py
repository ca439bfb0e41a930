"""A tiny random SNAC codec saved in the layout ``speechmill``'s SNAC loader reads.

:func:`build_snac` writes ``config.json`` + ``pytorch_model.bin`` for a model with
``snac_24khz``'s rates, strides and codebook size but toy widths, so codec tokenizers and
the exports that use them run in seconds without downloading weights. ``torch`` and
``snac`` are imported only when a model is built.
"""

from __future__ import annotations

import json
from pathlib import Path

# snac_24khz's config with tiny widths: same rates, strides and codebook size
SNAC_CONFIG: dict[str, object] = {
    "sampling_rate": 24000, "encoder_dim": 8, "encoder_rates": [2, 4, 8, 8],
    "decoder_dim": 16, "decoder_rates": [8, 8, 4, 2], "attn_window_size": None,
    "codebook_size": 4096, "codebook_dim": 8, "vq_strides": [4, 2, 1],
    "noise": True, "depthwise": True,
}


def build_snac(d: Path) -> Path:
    """Save a seeded random tiny SNAC model into the new folder ``d``; returns ``d``."""
    import torch
    from snac import SNAC

    torch.manual_seed(0)
    model = SNAC(**SNAC_CONFIG)
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(SNAC_CONFIG))
    torch.save(model.state_dict(), d / "pytorch_model.bin")
    return d
