"""Qwen3.5 (GGUF architectures ``qwen35`` and ``qwen35moe``).

Same blocks as Qwen3-Next (``models/qwen3next.py``) with two differences in the file:
beta and alpha are separate ``ssm_beta`` / ``ssm_alpha`` projections, and the converter
stores the value heads in *tiled* order, so value head p reads key head ``p % Hk``.
Attention uses interleaved M-RoPE, which for text (all position streams equal) is exactly
the partial NeoX RoPE of Qwen3-Next. Whether the FFN is MoE (``qwen35moe``) or dense
(``qwen35``) follows from the metadata, so one class serves both.
"""

from __future__ import annotations

from .qwen3next import Qwen3Next


class Qwen35(Qwen3Next):
    v_head_order = "tiled"

    def _beta_alpha(self, i, tk):
        a = self.args
        return {"ssm_beta": tk("ssm_beta.weight", (a.n_embd, a.ssm_v_heads)),
                "ssm_alpha": tk("ssm_alpha.weight", (a.n_embd, a.ssm_v_heads))}
