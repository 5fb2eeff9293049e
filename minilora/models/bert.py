"""BERT (Devlin et al. 2019) and DistilBERT (Sanh et al. 2019) encoders, with the Hub's tensor names.

Both are post-norm encoders (x = LayerNorm(x + sublayer(x))) over word + position (+ token type)
embeddings, attending in both directions with padded keys masked out. The heads:
  classification   DistilBERT: first token -> pre_classifier -> ReLU -> classifier;
                   BERT: first token -> pooler (dense + tanh) -> classifier
  embedding        the last hidden states; `mean_pool` averages the real tokens (sentence-transformers)
A checkpoint of the bare encoder (BertModel, DistilBertForMaskedLM) loads for classification too:
the head it lacks starts fresh, its MLM head is ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from .common import PretrainedModel, activation


@dataclass
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    classifier_dropout: float | None = None
    pad_token_id: int | None = 0
    id2label: dict | None = None
    num_labels: int | None = None
    model_type: str = "bert"

    def __post_init__(self) -> None:
        self.num_labels = check_labels(self.id2label, self.num_labels)


@dataclass
class DistilBertConfig:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    hidden_dim: int
    activation: str = "gelu"
    max_position_embeddings: int = 512
    sinusoidal_pos_embds: bool = False
    dropout: float = 0.1
    attention_dropout: float = 0.1
    seq_classif_dropout: float = 0.2
    pad_token_id: int | None = 0
    id2label: dict | None = None
    num_labels: int | None = None
    model_type: str = "distilbert"

    def __post_init__(self) -> None:
        self.num_labels = check_labels(self.id2label, self.num_labels)
        if self.sinusoidal_pos_embds:
            raise ConfigError("sinusoidal_pos_embds=true is not supported")


def check_labels(id2label: dict | None, num_labels: int | None) -> int:
    """The number of classes: num_labels, or as many as id2label names ({"0": "negative", ...}), or 2."""
    if id2label:
        if not all(str(k).isdecimal() for k in id2label) or sorted(int(k) for k in id2label) != list(range(len(id2label))):
            raise ConfigError(f"id2label must map the class ids 0, 1, ... to names, got {id2label!r}")
        if num_labels is not None and num_labels != len(id2label):
            raise ConfigError(f"num_labels={num_labels} but id2label names {len(id2label)} classes")
    return num_labels or (len(id2label) if id2label else 2)


class EncoderAttention(nn.Module):
    """Bidirectional multi-head attention; `mask` (B, 1, 1, T) is True on real keys."""

    def __init__(self, dim: int, n_head: int, dropout: float, names: tuple[str, str, str]) -> None:
        super().__init__()
        if dim % n_head:
            raise ConfigError(f"config.json: hidden size {dim} is not divisible by {n_head} heads")
        self.n_head, self.dropout, self.names = n_head, dropout, names
        for name in names:
            setattr(self, name, nn.Linear(dim, dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (getattr(self, n)(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for n in self.names)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)


def key_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    return None if attention_mask is None or bool(attention_mask.all()) else attention_mask.bool()[:, None, None, :]


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of the real tokens' hidden states (B, C): sentence-transformers' pooling."""
    m = attention_mask[..., None].to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


# --- DistilBERT ---------------------------------------------------------------------------------

class DistilBertEmbeddings(nn.Module):
    def __init__(self, cfg: DistilBertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.dim)
        self.LayerNorm = nn.LayerNorm(cfg.dim, eps=1e-12)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        return self.dropout(self.LayerNorm(self.word_embeddings(ids) + self.position_embeddings(pos)))


class DistilBertFFN(nn.Module):
    def __init__(self, cfg: DistilBertConfig) -> None:
        super().__init__()
        self.lin1, self.lin2 = nn.Linear(cfg.dim, cfg.hidden_dim), nn.Linear(cfg.hidden_dim, cfg.dim)
        self.act, self.dropout = activation(cfg.activation), nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.lin2(self.act(self.lin1(x))))


class DistilBertAttention(EncoderAttention):
    def __init__(self, cfg: DistilBertConfig) -> None:
        super().__init__(cfg.dim, cfg.n_heads, cfg.attention_dropout, ("q_lin", "k_lin", "v_lin"))
        self.out_lin = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, x, mask):
        return self.out_lin(super().forward(x, mask))


class DistilBertLayer(nn.Module):
    def __init__(self, cfg: DistilBertConfig) -> None:
        super().__init__()
        self.attention = DistilBertAttention(cfg)
        self.sa_layer_norm = nn.LayerNorm(cfg.dim, eps=1e-12)
        self.ffn = DistilBertFFN(cfg)
        self.output_layer_norm = nn.LayerNorm(cfg.dim, eps=1e-12)

    def forward(self, x, mask):
        x = self.sa_layer_norm(x + self.attention(x, mask))
        return self.output_layer_norm(x + self.ffn(x))


class DistilBertTransformer(nn.Module):
    def __init__(self, cfg: DistilBertConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(DistilBertLayer(cfg) for _ in range(cfg.n_layers))


class DistilBertModel(nn.Module):
    def __init__(self, cfg: DistilBertConfig) -> None:
        super().__init__()
        self.embeddings = DistilBertEmbeddings(cfg)
        self.transformer = DistilBertTransformer(cfg)

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x, mask = self.embeddings(ids), key_mask(attention_mask)
        for layer in self.transformer.layer:
            x = layer(x, mask)
        return x  # (B, T, dim)


# --- BERT ---------------------------------------------------------------------------------------

class BertEmbeddings(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        types = token_type_ids if token_type_ids is not None else torch.zeros_like(ids)
        x = self.word_embeddings(ids) + self.position_embeddings(pos) + self.token_type_embeddings(types)
        return self.dropout(self.LayerNorm(x))


class BertSelfOutput(nn.Module):
    """dense -> dropout -> LayerNorm(. + residual); BERT's attention output and its FFN output alike."""

    def __init__(self, d_in: int, d_out: int, cfg: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        self.LayerNorm = nn.LayerNorm(d_out, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)


class BertAttention(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.self = EncoderAttention(cfg.hidden_size, cfg.num_attention_heads, cfg.attention_probs_dropout_prob,
                                     ("query", "key", "value"))
        self.output = BertSelfOutput(cfg.hidden_size, cfg.hidden_size, cfg)

    def forward(self, x, mask):
        return self.output(self.self(x, mask), x)


class BertIntermediate(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.act = activation(cfg.hidden_act)

    def forward(self, x):
        return self.act(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.attention = BertAttention(cfg)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertSelfOutput(cfg.intermediate_size, cfg.hidden_size, cfg)

    def forward(self, x, mask):
        x = self.attention(x, mask)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.num_hidden_layers))


class BertPooler(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))


class BertModel(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoder(cfg)
        self.pooler = BertPooler(cfg)

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        x, mask = self.embeddings(ids, token_type_ids), key_mask(attention_mask)
        for layer in self.encoder.layer:
            x = layer(x, mask)
        return x  # (B, T, hidden)


# --- The task models ------------------------------------------------------------------------------

class Encoder(PretrainedModel):
    """What the encoder models share: the backbone under its checkpoint name, the checkpoint name
    mapping, fresh heads over a bare encoder. As is, an embedding model: forward gives the last
    hidden states (B, T, C), `embed` mean-pools them. The classifiers add a head on the first token."""

    prefix: str                 # "bert" or "distilbert": the backbone's attribute name
    backbone: type[nn.Module]   # BertModel or DistilBertModel
    ignored = ("vocab_transform.", "vocab_layer_norm.", "vocab_projector.", "cls.", "qa_outputs.")
    task_type = "FEATURE_EXTRACTION"

    def __init__(self, cfg) -> None:
        super().__init__()
        self.config = cfg
        setattr(self, self.prefix, self.backbone(cfg))

    @property
    def max_length(self) -> int:
        return self.config.max_position_embeddings

    @property
    def input_embeddings(self) -> nn.Embedding:
        return getattr(self, self.prefix).embeddings.word_embeddings

    @classmethod
    def checkpoint_to_model(cls, name: str, tensor: torch.Tensor):
        if name.endswith("position_ids") or name.startswith(cls.ignored):
            return None  # a saved arange buffer; masked-LM heads we do not use
        if not name.startswith((cls.prefix + ".", *(h + "." for h in cls.task_head))):
            name = f"{cls.prefix}.{name}"  # the bare encoder's layout (BertModel, as all-MiniLM-L6-v2)
        return name, tensor

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return getattr(self, self.prefix)(input_ids, attention_mask)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Sentence embeddings (B, C): the backbone's last hidden states, mean-pooled over real tokens."""
        return mean_pool(getattr(self, self.prefix)(input_ids, attention_mask), attention_mask)

    def init_head(self, name: str, shape: torch.Size, device) -> torch.Tensor | None:
        """A fresh head tensor, as transformers initialises one: N(0, 0.02) weights, zero biases (drawn on
        the CPU, so that a seed gives the same head on any device)."""
        if not name.startswith(tuple(h + "." for h in self.task_head)):
            return None
        t = torch.zeros(shape)
        return (t.normal_(0.0, 0.02) if name.endswith("weight") else t).to(device)


class BertForEmbedding(Encoder):
    config_class, prefix, backbone = BertConfig, "bert", BertModel
    blocks = "bert.encoder.layer"
    fingerprint_fields = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers")


class DistilBertForEmbedding(Encoder):
    config_class, prefix, backbone = DistilBertConfig, "distilbert", DistilBertModel
    blocks = "distilbert.transformer.layer"
    fingerprint_fields = ("model_type", "vocab_size", "dim", "n_layers")


class BertForSequenceClassification(BertForEmbedding):
    """first token -> pooler (dense + tanh, part of the pretrained encoder) -> dropout -> classifier."""
    task_type = "SEQ_CLS"
    output_heads = task_head = ("classifier",)

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__(cfg)
        p = cfg.classifier_dropout if cfg.classifier_dropout is not None else cfg.hidden_dropout_prob
        self.dropout = nn.Dropout(p)
        self.classifier = nn.Linear(cfg.hidden_size, cfg.num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, num_labels)."""
        h = self.bert(input_ids, attention_mask, token_type_ids)
        return self.classifier(self.dropout(self.bert.pooler(h)))


class DistilBertForSequenceClassification(DistilBertForEmbedding):
    """first token -> pre_classifier -> ReLU -> dropout -> classifier; both linears are the task head."""
    task_type = "SEQ_CLS"
    output_heads, task_head = ("classifier",), ("pre_classifier", "classifier")

    def __init__(self, cfg: DistilBertConfig) -> None:
        super().__init__(cfg)
        self.pre_classifier = nn.Linear(cfg.dim, cfg.dim)
        self.classifier = nn.Linear(cfg.dim, cfg.num_labels)
        self.dropout = nn.Dropout(cfg.seq_classif_dropout)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, num_labels)."""
        h = self.distilbert(input_ids, attention_mask)[:, 0]
        return self.classifier(self.dropout(F.relu(self.pre_classifier(h))))
