"""Whitespace tokenizing and first-seen numbering of a block of text in numpy, without one Python string per
token: the fast path of `Vocab` for word-level text (`delimiter=None`) and of prepare_corpus's word level.

`str.split()` on the whole block then one dict look-up per token costs ~200 ns per token in Python (a new
string object, its hash, the look-up); the reference's algorithm does that twice plus a Python call per
token. Here the block is encoded to UTF-8 and handled as bytes (`scan_words`):

1. Tokens are the maximal runs of bytes that are not whitespace, and each line end ("\n") is a token of its
   own (so line ends need no second pass). Python's `str.split()` splits on the ASCII whitespace below and
   on 19 non-ASCII characters; a block holding any of those (found among the bytes from 0xC2 up) is left to
   the Python path, so the tokens here are exactly `str.split()`'s. ASCII bytes never occur inside a
   multi-byte UTF-8 character, so every token is whole characters.
2. Each token gets a 64-bit key: a token of up to 7 bytes is its own key (its bytes and its length: exact);
   a longer one gets a hash of its bytes read 8 at a time (`_mix`, splitmix64's finalizer), top bit set.
3. Equal keys are grouped through a table indexed by the key's multiplied top bits (tokens whose slot
   another key took retry in another table, until none is left); the first token of each group comes from
   `np.minimum.at`, and the groups' first tokens in text order are the block's symbols in first-seen order.
4. Exactness does not rest on the hash: every long token is compared with its group's first token (length
   and every byte). Should two different tokens ever share a hash, the block goes to the Python path.

The result (`WordBlock`) gives per-token values from per-symbol ones (`ids`) and the symbols' counts in one
pass each. Only the symbols asked for become Python strings: `KeyTable` keeps the keys (and a long symbol's
bytes, compared byte for byte on a match) of symbols numbered in earlier blocks, so a later block decodes
only its new symbols. `first_seen_ids(text)` equals `text.replace("\n", f" {marker} ").split()` numbered
in first-seen order, with -2 for the marker.
"""
import numpy as np

# The ASCII characters str.split() treats as whitespace (\t \n \v \f \r, \x1c-\x1f, space) ...
_SPACE_BUT_LINE_END = bytes(c in (9, 11, 12, 13, 28, 29, 30, 31, 32) for c in range(256))  # (scan: "\n" is a token)
# ... and the UTF-8 bytes of the non-ASCII ones (U+0085, U+00A0, U+1680, U+2000-U+200A, U+2028, U+2029,
# U+202F, U+205F, U+3000): a block that has one goes to the Python path.
_OTHER_SPACES = [chr(c).encode("utf-8") for c in (0x85, 0xA0, 0x1680, *range(0x2000, 0x200B), 0x2028, 0x2029, 0x202F,
                                                  0x205F, 0x3000)]


def _has_other_space(buf: np.ndarray) -> bool:
    """Whether the UTF-8 bytes `buf` (which end with at least 2 ASCII bytes) hold one of _OTHER_SPACES (all
    start with 0xC2 or above)."""
    lead = np.flatnonzero(buf >= 0xC2)
    if not len(lead):
        return False
    code = (buf[lead].astype(np.int64) << 16) | (buf[lead + 1].astype(np.int64) << 8) | buf[lead + 2]
    two = np.array([int.from_bytes(s, "big") << 8 for s in _OTHER_SPACES if len(s) == 2])
    three = np.array([int.from_bytes(s, "big") for s in _OTHER_SPACES if len(s) == 3])
    return bool(np.isin(code & ~0xFF, two).any() or np.isin(code, three).any())


# _LOW_BYTES[k]: the mask that keeps the first k bytes of a little-endian 8-byte word (k = 0..8).
_LOW_BYTES = np.array([(1 << (8 * k)) - 1 for k in range(8)] + [(1 << 64) - 1], np.uint64)
_SPACES_AFTER = ~_LOW_BYTES & np.uint64(0x2020202020202020)  # spaces in the bytes that _LOW_BYTES[k] clears
_MAX_TABLE_BITS = 18
_ROUND_MULTIPLIERS = [np.uint64(m) for m in (0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9,
                                              0xD6E8FEB86659FD93, 0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53,
                                              0x9FB21C651E98DF25)]


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer, in place on a uint64 array (wrapping arithmetic)."""
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def _words(words_at: np.ndarray, starts: np.ndarray, lengths: np.ndarray, k: int) -> np.ndarray:
    """Bytes 8k .. 8k+7 of each token as a little-endian uint64, the bytes past its end zeroed (`words_at[i]`
    is the 8 bytes from offset i)."""
    word = words_at[starts + 8 * k] if k else words_at[starts]
    word &= _LOW_BYTES[np.clip(lengths - 8 * k, 0, 8) if k else np.minimum(lengths, 8)]
    return word


def _group(h: np.ndarray) -> tuple[np.ndarray, int]:
    """(group, n_groups): a group number per token, equal exactly when the keys `h` are equal.

    Each round writes the keys into a table at the top bits of key x an odd constant (at most 2^18 slots,
    2 MB, in cache: a block has far fewer distinct symbols than tokens); a slot ends up holding one of the
    keys written to it, the tokens of that key take the slot as their group and the others retry in the next
    table with another constant."""
    bits = min(max(8, (2 * len(h)).bit_length()), _MAX_TABLE_BITS)
    group = h * _ROUND_MULTIPLIERS[0]  # (keys need not be mixed)
    group >>= np.uint64(64 - bits)
    group = group.view(np.int64)
    table = np.empty(1 << bits, np.uint64)
    table[group] = h
    lost = np.flatnonzero(table[group] != h)
    n_groups = 1 << bits
    for multiplier in _ROUND_MULTIPLIERS[1:]:
        if not len(lost):
            return group, n_groups
        hl = h[lost]
        bits = min(max(8, (2 * len(lost)).bit_length()), _MAX_TABLE_BITS)
        slot = ((hl * multiplier) >> np.uint64(64 - bits)).view(np.int64)
        table = np.empty(1 << bits, np.uint64)
        table[slot] = hl
        won = table[slot] == hl
        group[lost[won]] = slot[won] + n_groups
        lost = lost[~won]
        n_groups += 1 << bits
    if len(lost):  # a few left after every round: sort them
        group[lost] = n_groups + np.unique(h[lost], return_inverse=True)[1].ravel()
        n_groups += len(lost)
    return group, n_groups


def _decode(words_at: np.ndarray, first_word: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> list[str] | None:
    """The tokens at `starts` as strings (`first_word`: their first 8 bytes as `_words` gives them): each one
    written as whole 8-byte words, the bytes after its end spaces (at least one), so that one decode and one
    `split()` give them back (a token has no whitespace, and is whole UTF-8 characters). None if the count
    does not come out (it cannot: the caller then takes the Python path)."""
    if not len(starts):
        return []
    n_words = lengths // 8 + 1
    slot = np.cumsum(n_words) - n_words
    out = np.empty(int(slot[-1] + n_words[-1]), "<u8")
    out[slot] = first_word | _SPACES_AFTER[np.minimum(lengths, 8)]
    more = np.flatnonzero(lengths >= 8)
    k = 1
    while len(more):
        rest = lengths[more] - 8 * k
        out[slot[more] + k] = _words(words_at, starts[more], lengths[more], k) | _SPACES_AFTER[np.clip(rest, 0, 8)]
        k += 1
        more = more[rest >= 8]
    symbols = out.tobytes().decode("utf-8").split()
    return symbols if len(symbols) == len(starts) else None


def settle_allocator(nbytes: int = 30 << 20) -> None:
    """Let freed block-sized arrays stay with the process instead of going back to the system at once.

    glibc's malloc serves a request above its mmap threshold (128 KB at start) with a fresh mmap, and gives the
    top of its heap back once more than twice that threshold is free there; each time a large block of memory
    is freed through mmap it raises both to that size. Until that has happened, every temporary array of a
    block (a few MB each, a dozen per block) is new memory, and its page faults cost about as much as the
    arithmetic (a WikiText-103 valid block: ~4,500 faults, 20 ms instead of 11 ms). Allocating and freeing one
    `nbytes` buffer (never touched: no page is faulted in) raises the threshold as glibc's own heuristic would
    after any large free; the process may then keep up to 2 x nbytes of freed memory for reuse. Elsewhere
    (another malloc) this is one harmless allocation."""
    np.empty(nbytes, np.uint8)


def _keys(words_at: np.ndarray, starts: np.ndarray, lengths: np.ndarray, first_word: np.ndarray) -> np.ndarray:
    """The 64-bit key of each token (`first_word`: its first 8 bytes as _words gives them)."""
    # A token of up to 7 bytes is its own key: its bytes, and its length in the top byte (exact, top bit 0).
    key = lengths.astype(np.uint64)
    key <<= np.uint64(56)
    key |= first_word
    # A longer one gets a 64-bit hash of all its bytes, with the top bit set (never a short token's key).
    long = np.flatnonzero(lengths > 7)
    if len(long):
        long_starts, long_lengths = starts[long], lengths[long]
        h = _mix(first_word[long] ^ (long_lengths.astype(np.uint64) * _ROUND_MULTIPLIERS[0]))
        more = np.flatnonzero(long_lengths > 8)
        k = 1
        while len(more):
            h[more] = _mix(h[more] ^ _words(words_at, long_starts[more], long_lengths[more], k))
            k += 1
            more = more[long_lengths[more] > 8 * k]
        key[long] = h | np.uint64(1 << 63)
    return key


def symbol_keys(symbols: list[str]) -> np.ndarray:
    """The keys (uint64) that scan_words gives these symbols as tokens (any strings without a newline)."""
    if not symbols:
        return np.zeros(0, np.uint64)
    data = "\n".join(symbols).encode("utf-8") + b"\n"
    buf = data + _PAD
    ends = np.flatnonzero(np.frombuffer(data, np.uint8) == 10)
    if len(ends) != len(symbols):
        raise ValueError("a symbol holds a newline")
    starts = np.concatenate(([0], ends[:-1] + 1)).astype(np.int64)
    lengths = ends - starts
    words_at = np.ndarray((len(buf) - 7,), "<u8", buffer=buf, strides=(1,))
    return _keys(words_at, starts, lengths, _words(words_at, starts, lengths, 0))


# A line end is a token of its own (see scan_words): the 1-byte token "\n", which no word can be (it is whitespace).
_LINE_END_KEY = np.uint64((1 << 56) | 10)
_PAD = b" " * 15  # after the text: 8-byte reads past a token's end stay inside the buffer (those bytes are masked)


class WordBlock:
    """A block of text tokenized and grouped by `scan_words`: `symbols` (the distinct tokens in first-seen order,
    line ends not included; decoded when first asked for), `group` (a group number per token, line ends
    included) and the group of each symbol. `ids(values)` and `counts()` turn per-symbol values into per-token
    ones with one pass over the tokens; `keys`, `starts`, `lengths` are the symbols' keys and bytes (for a
    KeyTable)."""

    def __init__(self, group: np.ndarray, n_groups: int, symbol_groups: np.ndarray, line_end_group: int | None,
                 words_at: np.ndarray, first_word: np.ndarray, starts: np.ndarray, lengths: np.ndarray,
                 keys: np.ndarray):
        self.group, self.n_groups = group, n_groups
        self.symbol_groups, self.line_end_group = symbol_groups, line_end_group
        self.words_at, self.first_word, self.starts, self.lengths, self.keys = words_at, first_word, starts, lengths, keys
        self._symbols: list[str] | None = None

    @property
    def symbols(self) -> list[str]:
        if self._symbols is None:
            self._symbols = self.decode(np.arange(len(self.keys)))
        return self._symbols

    def decode(self, which: np.ndarray) -> list[str]:
        """The symbols `which` (indices, ascending) as strings."""
        symbols = _decode(self.words_at, self.first_word[which], self.starts[which], self.lengths[which])
        if symbols is None:
            raise RuntimeError("fast_words: the decoded symbols do not match the tokens")  # (cannot happen)
        return symbols

    def joined(self) -> bytes:
        """The symbols' UTF-8 bytes joined by newlines ("\n".join(symbols).encode(), without the strings): their
        8-byte words padded with spaces, the first space after each symbol made a newline, the spaces dropped."""
        if not len(self.keys):
            return b""
        n_words = self.lengths // 8 + 1
        slot = np.cumsum(n_words) - n_words
        out = np.empty(int(slot[-1] + n_words[-1]), "<u8")
        out[slot] = self.first_word | _SPACES_AFTER[np.minimum(self.lengths, 8)]
        more = np.flatnonzero(self.lengths >= 8)
        k = 1
        while len(more):
            rest = self.lengths[more] - 8 * k
            out[slot[more] + k] = self.word(more, k) | _SPACES_AFTER[np.clip(rest, 0, 8)]
            k += 1
            more = more[rest >= 8]
        data = out.view(np.uint8)
        data[8 * slot + self.lengths] = 10
        return data[data != 32].tobytes()[:-1]

    def word(self, which: np.ndarray, k: int) -> np.ndarray:
        """Bytes 8k .. 8k+7 of the symbols `which`, as _words gives them."""
        if k == 0:
            return self.first_word[which]
        return _words(self.words_at, self.starts[which], self.lengths[which], k)

    def ids(self, values: np.ndarray, line_end: int = -2) -> np.ndarray:
        """values[i] for each token of symbol i, `line_end` at each line end (int64)."""
        table = np.empty(self.n_groups, np.int64)
        table[self.symbol_groups] = values
        if self.line_end_group is not None:
            table[self.line_end_group] = line_end
        return table[self.group]

    def counts(self) -> np.ndarray:
        """How many times each symbol occurs in the block (int64, in the order of `symbols`)."""
        return np.bincount(self.group, minlength=self.n_groups)[self.symbol_groups]


class KeyTable:
    """Numbers already given to symbols, by their key (WordBlock.keys), so that the symbols of a later block
    that are found here need not become Python strings. The key of a symbol of up to 7 bytes is the symbol
    itself; a longer one's is a hash, so its bytes are kept here and a match is compared with them byte for
    byte (a symbol whose bytes differ is reported not found, and the caller looks it up by its string).

    Keys are kept in two sorted levels: new ones are merged into the small one, which is merged into the large
    one when it reaches a quarter of its size, so that adding costs O(size) only now and then, not per block."""

    _FIELDS = ("keys", "values", "lengths", "offsets")  # offsets: of a long symbol's words in self.words

    def __init__(self):
        empty = {"keys": np.zeros(0, np.uint64), **{f: np.zeros(0, np.int64) for f in self._FIELDS[1:]}}
        self.levels = [dict(empty), dict(empty)]  # large, small
        self.words = np.zeros(0, np.uint64)

    @staticmethod
    def _positions(level: dict, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pos = np.minimum(np.searchsorted(level["keys"], keys), max(len(level["keys"]) - 1, 0))
        found = (level["keys"][pos] == keys) if len(level["keys"]) else np.zeros(len(keys), np.bool_)
        return pos, found

    def find(self, block: WordBlock) -> tuple[np.ndarray, np.ndarray]:
        """(values, found) for the block's symbols (values -1 where not found)."""
        values = np.full(len(block.keys), -1, np.int64)
        found = np.zeros(len(block.keys), np.bool_)
        for level in self.levels:
            todo = np.flatnonzero(~found)
            pos, hit = self._positions(level, block.keys[todo])
            todo, pos = todo[hit], pos[hit]
            long = np.flatnonzero(block.keys[todo] >= np.uint64(1 << 63))
            if len(long):  # a hashed key: the same length and the same bytes, 8 at a time
                mine, at = todo[long], pos[long]
                ok = level["lengths"][at] == block.lengths[mine]
                for k in range(int(block.lengths[mine].max() + 7) // 8):
                    check = np.flatnonzero(ok & (block.lengths[mine] > 8 * k))
                    if not len(check):
                        break
                    ok[check] &= self.words[level["offsets"][at[check]] + k] == block.word(mine[check], k)
                keep = np.ones(len(todo), np.bool_)
                keep[long[~ok]] = False  # (another symbol with this key: not found)
                todo, pos = todo[keep], pos[keep]
            values[todo] = level["values"][pos]
            found[todo] = True
        return values, found

    def add(self, block: WordBlock, which: np.ndarray, values: np.ndarray) -> None:
        """Record values[j] as the number of the block's symbol which[j] (a key already here keeps its own)."""
        keys = block.keys[which]
        present = np.zeros(len(keys), np.bool_)
        for level in self.levels:
            present |= self._positions(level, keys)[1]
        which, keys, values = which[~present], keys[~present], values[~present]
        if not len(which):
            return
        lengths = block.lengths[which]
        n_words = np.where(keys >= np.uint64(1 << 63), (lengths + 7) // 8, 0)  # (short symbols: the key is exact)
        offsets = len(self.words) + np.cumsum(n_words) - n_words
        words = np.empty(int(n_words.sum()), np.uint64)
        for k in range(int(n_words.max())):
            mine = np.flatnonzero(n_words > k)
            words[offsets[mine] - len(self.words) + k] = block.word(which[mine], k)
        self.words = np.concatenate((self.words, words))
        order = np.argsort(keys)
        new = {"keys": keys[order], "values": values[order], "lengths": lengths[order], "offsets": offsets[order]}
        large, small = self.levels
        small = self._merged(small, new)
        if len(small["keys"]) * 4 >= len(large["keys"]):
            large, small = self._merged(large, small), {f: a[:0] for f, a in small.items()}
        self.levels = [large, small]

    @classmethod
    def _merged(cls, level: dict, new: dict) -> dict:
        """The two sorted levels as one (their keys are distinct)."""
        slots = np.searchsorted(level["keys"], new["keys"]) + np.arange(len(new["keys"]))
        old = np.ones(len(level["keys"]) + len(new["keys"]), np.bool_)
        old[slots] = False
        return {f: _merge(level[f], old, slots, new[f]) for f in cls._FIELDS}


def _merge(array: np.ndarray, old: np.ndarray, slots: np.ndarray, new: np.ndarray) -> np.ndarray:
    out = np.empty(len(old), array.dtype)
    out[slots] = new
    out[old] = array
    return out


def scan_words(text: str) -> WordBlock | None:
    """`text` split on whitespace, each line end ("\n") kept as a token, the tokens grouped by equal value (see
    the module docstring); None when the block has non-ASCII whitespace (or, against all odds, a hash
    collision): the caller then takes the Python path."""
    data = text.encode("utf-8").replace(b"\n", b" \n ")  # a line end becomes a token of its own
    buf = b"".join((b" ", data, _PAD))  # (offsets below are in buf; the leading space starts the first token)
    array = np.frombuffer(buf, np.uint8)
    if not text.isascii() and _has_other_space(array):
        return None
    space = np.frombuffer(buf.translate(_SPACE_BUT_LINE_END), np.bool_)  # (translate: C speed)
    edges = np.flatnonzero(space[1:] != space[:-1])  # before a start, before an end, ... (buf has spaces around)
    starts = edges[0::2] + 1
    lengths = edges[1::2] - edges[0::2]
    n = len(starts)
    if n == 0:
        empty = np.zeros(0, np.int64)
        return WordBlock(empty, 0, empty, None, np.zeros(0, "<u8"), np.zeros(0, np.uint64), empty, empty,
                         np.zeros(0, np.uint64))
    words_at = np.ndarray((len(buf) - 7,), "<u8", buffer=buf, strides=(1,))  # unaligned: bytes i .. i+7
    first_word = _words(words_at, starts, lengths, 0)
    key = _keys(words_at, starts, lengths, first_word)
    long = np.flatnonzero(lengths > 7)
    if len(long):
        long_starts, long_lengths = starts[long], lengths[long]
    group, n_groups = _group(key)
    # the first token of each group, then the groups in the order of their first token
    first = np.full(n_groups, n, np.int64)
    np.minimum.at(first, group, np.arange(n))
    is_first = np.zeros(n, np.bool_)
    is_first[first[first < n]] = True
    reps = np.flatnonzero(is_first)  # (in text order: no sort)
    # A long token's group is its hash's: check that it equals the group's first token (the same length and the
    # same bytes, 8 at a time) rather than trust the hash.
    if len(long):
        rep = first[group[long]]
        if not ((lengths[rep] == long_lengths).all() and (first_word[rep] == first_word[long]).all()):
            return None
        more = np.flatnonzero(long_lengths > 8)
        k = 1
        while len(more):
            mine = _words(words_at, long_starts[more], long_lengths[more], k)
            if not (mine == _words(words_at, starts[rep[more]], long_lengths[more], k)).all():
                return None
            k += 1
            more = more[long_lengths[more] > 8 * k]
    line_end = key[reps] == _LINE_END_KEY
    at = np.flatnonzero(line_end)
    line_end_group = int(group[reps[at[0]]]) if len(at) else None
    reps = reps[~line_end]
    return WordBlock(group, n_groups, group[reps], line_end_group, words_at, first_word[reps], starts[reps],
                     lengths[reps], key[reps])


def first_seen_ids(text: str) -> tuple[list[str], np.ndarray] | None:
    """(symbols, ids) of `text` split on whitespace: `symbols` the distinct tokens in first-seen order, `ids`
    (int64) the index in `symbols` of each token with LINE_END (-2) at each newline; None when the block has
    non-ASCII whitespace (or, against all odds, a hash collision): the caller then takes the Python path."""
    block = scan_words(text)
    if block is None:
        return None
    return block.symbols, block.ids(np.arange(len(block.symbols)))
