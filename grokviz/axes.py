"""The axis glossary: one word per axis, used in hook declarations, einops patterns and plot labels."""

AXES = {
    "layer": "decoder layer index (leading axis of every blocks.* hook and stacked parameter)",
    "batch": "sequence in the batch",
    "seq": "query / token position",
    "kv_seq": "key position (attention)",
    "d_model": "residual stream feature",
    "head": "query head (head j reads KV head j // group)",
    "kv_head": "key/value head",
    "head_dim": "feature within one head",
    "expert": "expert index",
    "k": "routing slot (0 = first choice); slots are in descending router probability",
    "ffn": "expert hidden feature",
    "vocab": "vocabulary entry",
    "query": "a chosen query position (AttentionSpec.queries)",
    "rank": "rank among the top keys of a query (0 = most attended)",
}

LABELS = {
    "layer": "layer", "batch": "batch", "seq": "query position", "kv_seq": "key position",
    "d_model": "d_model", "head": "head", "kv_head": "KV head", "head_dim": "head dim",
    "expert": "expert", "k": "slot", "ffn": "ffn", "vocab": "token id",
    "query": "chosen query", "rank": "rank",
}


def label(axis: str) -> str:
    """Human label for an axis word (plot axis titles)."""
    return LABELS[axis]
