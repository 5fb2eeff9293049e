"""Examples from records: datasets read and tokenized (records.py), conversations and chat templates
(chat.py), padding, batching and packing (batching.py), and the real data and weights that arrive
through package registries (assets.py; what their package files hold: asset_files.py).

May import: minilora.formats and the ground floor. A tokenizer is whatever is passed in.
"""

from .records import Example, build_examples, read_records, split

__all__ = ["Example", "build_examples", "read_records", "split"]
