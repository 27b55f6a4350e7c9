"""Every tuning constant of npmerge, in one place.

BLOCK is part of the output contract (docs/semantics.md §A): float reductions (norms, dot
products) are accumulated per BLOCK elements and combined exactly, and spans are always
whole multiples of BLOCK, so results never depend on span size or thread count.
"""

# Elements per reduction block; spans are multiples of it. Also the unit of work a
# thread takes inside a span kernel: its decoded float32 rows stay in the L1/L2 cache.
BLOCK = 1 << 14

# A piece, the unit of work one thread takes from a span, is this many blocks: large
# enough that calling a kernel from Python costs ~1% of the piece (256 Ki elements), small
# enough that two threads share a span evenly.
PIECE_BLOCKS = 16

# A model's weights: one file, or an index naming the shards (Hugging Face's names).
SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
RECIPE_NAME = "npmerge_recipe.yml"  # the recipe as run: `npmerge run` and `verify --recompute` re-run it
REPORT_NAME = "merge_report.json"  # statistics and the size and sha256 of every other file (`verify`)
CARD_NAME = "README.md"

# Rows of an output vocabulary that name no token (id gaps, padding) may exceed the rows
# that do by at most this many; more means a damaged tokenizer or an absurd padding multiple.
VOCAB_SLACK = 1 << 16

# The official library's header cap (decimal 100 MB, `N == MAX_HEADER_BYTES` allowed).
MAX_HEADER_BYTES = 100_000_000

# JSON nesting deeper than this is refused (serde's recursion limit is ~128).
MAX_JSON_DEPTH = 128

# Default output shard limit in bytes of tensor data (decimal units, as transformers).
DEFAULT_SHARD_BYTES = 5_000_000_000

# A one-file output (-o NAME.safetensors) holds at most this much tensor data unless
# --shard-size says otherwise: the Hugging Face Hub's largest single file (a Flux
# checkpoint of 24 GB fits; a 70B model in one file is a mistake worth a question).
ONE_FILE_LIMIT = 50_000_000_000
# Header room a one-file output keeps for the merge summary written last (__metadata__).
ONE_FILE_SUMMARY_BYTES = 64 << 10

# Largest span, in elements: the range of a tensor one parallel kernel call covers.
# Large, so a merge has few barriers (on a busy machine each may wait for a thread that
# lost its time slice), but its raw input should still fit the last-level cache, where
# a second kernel over the same span (e.g. TIES tie counting, then merging) finds it.
MAX_SPAN_ELEMENTS = 1 << 21

# Input bytes the engine asks the kernel to read ahead of the tensor it merges (page cache,
# not npmerge's memory): reading from disk overlaps computing when inputs exceed RAM.
READAHEAD_BYTES = 2 << 30

# Default --max-memory: this fraction of available RAM, capped.
DEFAULT_MEMORY_FRACTION = 0.25
DEFAULT_MEMORY_CAP = 4 << 30

# Output data is written in pieces of at most this many bytes.
WRITE_PIECE_BYTES = 1 << 20

# Writeback of the output is started every this many bytes (not left to the final fsync).
WRITEBACK_BYTES = 32 << 20

# Safetensors header metadata written on every output shard (transformers requires it).
OUTPUT_METADATA = {"format": "pt"}
