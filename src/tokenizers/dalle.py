"""The DALL-E dVAE encoder (Ramesh et al. 2021) as a BEiT tokenizer, loaded from a file the user provides.

Its weights cannot be downloaded here, so only the architecture lives in this file: a ResNet-style
encoder of 4 groups x 2 blocks (widths 1, 2, 4, 8 x 256), max-pooling after the first three groups
(8x downsampling), a 7x7 input conv and a 1x1 output conv to 8192 logits. Each block adds
1/(8 blocks)^2 of its residual path to its identity path. Inputs go through the logit-Laplace map
x' = (1 - 2 * 0.1) x + 0.1 of [0, 1] images. Parameter names (``blocks.group_1.block_1.res_path.conv_1.w``
...) are the released encoder's, so its state dict loads strictly.

The release (``encoder.pkl``) is a pickled module: reading it runs code from the file, so it is
refused unless the person typing the command opts in (``objective.tokenizer.allow_pickle=true`` on the command
line; ``--allow-pickle`` for ``python -m src.export``; never from a run folder's recorded config, docs/security.md).
Convert it once to a plain state dict and use that from then on::

    python -c "import torch; from safetensors.torch import save_file; \\
        m = torch.load('encoder.pkl', weights_only=False); save_file(m.state_dict(), 'dalle_encoder.safetensors')"
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from src.encoders.loading import load_strict
from src.files import load_state_dict_file
from src.tokenizers.base import VisualTokenizer

LOGIT_LAPLACE_EPS = 0.1
BEIT_TOKENIZER_SIZE = 112  # BEiT feeds DALL-E the 224 px crop at 112 px: 14 x 14 tokens


def map_pixels(images: torch.Tensor) -> torch.Tensor:
    """DALL-E's logit-Laplace input range: [0, 1] -> [0.1, 0.9]."""
    return (1 - 2 * LOGIT_LAPLACE_EPS) * images + LOGIT_LAPLACE_EPS


class DalleConv(nn.Module):
    """A 'same'-padded convolution whose parameters are called ``w`` and ``b``, as in the release."""

    def __init__(self, n_in: int, n_out: int, kernel: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(n_out, n_in, kernel, kernel) / (n_in * kernel**2) ** 0.5)
        self.b = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.w, self.b, padding=(self.w.shape[-1] - 1) // 2)


class DalleEncoderBlock(nn.Module):
    def __init__(self, n_in: int, n_out: int, num_blocks: int) -> None:
        super().__init__()
        hidden = n_out // 4
        self.post_gain = 1 / num_blocks**2
        self.id_path = DalleConv(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        convs = [(n_in, hidden, 3), (hidden, hidden, 3), (hidden, hidden, 3), (hidden, n_out, 1)]
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        for i, (cin, cout, k) in enumerate(convs, start=1):
            layers[f"relu_{i}"] = nn.ReLU()
            layers[f"conv_{i}"] = DalleConv(cin, cout, k)
        self.res_path = nn.Sequential(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


class DalleEncoder(VisualTokenizer):
    """Frozen DALL-E dVAE encoder: token = argmax of its logits. There is no decoder here."""

    def __init__(
        self,
        group_count: int = 4,
        n_hid: int = 256,
        n_blk_per_group: int = 2,
        in_chans: int = 3,
        vocab_size: int = 8192,
    ) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.downsample = 2 ** (group_count - 1)
        self.img_size = BEIT_TOKENIZER_SIZE
        num_blocks = group_count * n_blk_per_group
        layers: OrderedDict[str, nn.Module] = OrderedDict(input=DalleConv(in_chans, n_hid, 7))
        width_in = n_hid
        for g in range(group_count):
            width = n_hid * 2**g
            group: OrderedDict[str, nn.Module] = OrderedDict()
            for i in range(n_blk_per_group):
                group[f"block_{i + 1}"] = DalleEncoderBlock(width_in, width, num_blocks)
                width_in = width
            if g < group_count - 1:
                group["pool"] = nn.MaxPool2d(kernel_size=2)
            layers[f"group_{g + 1}"] = nn.Sequential(group)
        layers["output"] = nn.Sequential(OrderedDict(relu=nn.ReLU(), conv=DalleConv(width_in, vocab_size, 1)))
        self.blocks = nn.Sequential(layers)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.blocks(map_pixels(images.float()))

    @classmethod
    def from_file(cls, path: str | Path, allow_pickle: bool = False, key: str = "objective.tokenizer") -> DalleEncoder:
        """Load the encoder from a state-dict file (safetensors or torch, read weights-only); refusals are
        ConfigErrors naming ``key``.

        A pickled module (DALL-E's ``encoder.pkl``) is unpickled only with ``allow_pickle=True``, the opt-in of
        the person typing the command; its weights are then copied into this implementation.
        """
        state = load_state_dict_file(path, f"{key}.path", allow_pickle)
        model = cls()
        load_strict(model, state, f"{key}.path={path} does not hold DALL-E encoder weights")
        return model.eval().requires_grad_(False)
