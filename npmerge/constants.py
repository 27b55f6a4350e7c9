"""Every tuning constant of npmerge, in one place.

BLOCK is part of the output contract: float reductions (norms, dot products) are
accumulated per BLOCK elements and combined in index order, and chunks are always
whole multiples of BLOCK, so results never depend on chunk size or thread count.
Changing it may change the last bits of reported statistics (never of merged
weights, which are element-wise).
"""

# Elements per reduction block; chunks are multiples of it.
BLOCK = 1 << 14

# The official library's header cap (decimal 100 MB, `N == MAX_HEADER_BYTES` allowed).
MAX_HEADER_BYTES = 100_000_000

# JSON nesting deeper than this is refused (serde's recursion limit is ~128).
MAX_JSON_DEPTH = 128

# Default output shard limit in bytes of tensor data (decimal units, as transformers).
DEFAULT_SHARD_BYTES = 5_000_000_000

# Smallest chunk the planner will use, in elements (one reduction block).
MIN_CHUNK_ELEMENTS = BLOCK

# Largest chunk, in elements. A chunk's float32 rows (models + base + output) should
# stay in the L2/L3 caches between the decode, statistics, merge and encode kernels:
# measured on a 2-core Xeon (TA, 3 fine-tunes), 4 Mi elements cost 1.7-1.9x the time
# of 256 Ki (memory-bound passes), while 64 Ki starts to pay kernel dispatch overhead.
MAX_CHUNK_ELEMENTS = 1 << 18

# Default --max-memory: this fraction of available RAM, capped.
DEFAULT_MEMORY_FRACTION = 0.25
DEFAULT_MEMORY_CAP = 4 << 30

# Output data is written in pieces of at most this many bytes.
WRITE_PIECE_BYTES = 1 << 20

# Writeback of the output is started every this many bytes (not left to the final fsync).
WRITEBACK_BYTES = 32 << 20

# Safetensors header metadata written on every output shard (transformers requires it).
OUTPUT_METADATA = {"format": "pt"}
