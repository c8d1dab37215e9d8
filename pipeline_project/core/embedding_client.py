"""The interface every embedding backend's client has: texts in, one vector per text out."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class EmbeddingResponse:
    vectors: np.ndarray  # (n_returned, width); n_returned may differ from the texts sent
    tokens: int | None = None


class EmbeddingClient(Protocol):
    def embed(self, texts: Sequence[str]) -> EmbeddingResponse: ...
