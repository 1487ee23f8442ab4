"""Image ids as one Arrow string array that reads as a list of str: a night's input of millions of
files is no Python object per image on the driver (`vitray.data.sources`, `vitray.score.planning`)."""
from __future__ import annotations

import operator
from typing import Any, Iterable, Iterator, Sequence, overload

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


class Ids(Sequence[str]):
    """Image ids in order, held as one Arrow string array (no Python object per id), used as a
    list of str: indexed, iterated, compared with a list, handed to `pa.array` without a copy."""

    __slots__ = ("array",)

    def __init__(self, values: Iterable[str] | pa.Array | pa.ChunkedArray = ()) -> None:
        if isinstance(values, Ids):
            array = values.array
        elif isinstance(values, pa.ChunkedArray):
            array = values.combine_chunks()
        elif isinstance(values, pa.Array):
            array = values
        else:
            array = pa.array(values if isinstance(values, (list, tuple)) else list(values), pa.string())
        self.array: pa.Array = array.cast(pa.string())

    def __len__(self) -> int:
        return len(self.array)

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> "Ids": ...

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return Ids(self.array[index])
        return self.array[operator.index(index)].as_py()

    def __iter__(self) -> Iterator[str]:
        for start in range(0, len(self.array), 65_536):
            yield from self.array.slice(start, 65_536).to_pylist()

    def __contains__(self, value: object) -> bool:
        return isinstance(value, str) and bool(pc.any(pc.equal(self.array, value)).as_py())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Ids):
            return self.array.equals(other.array)
        if isinstance(other, list):
            return len(other) == len(self) and list(self) == other
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # equal to lists, which are not hashable either

    def __repr__(self) -> str:
        shown = ", ".join(repr(i) for i in self[:3])
        return f"Ids([{shown}{', ...' if len(self) > 3 else ''}], {len(self):,} ids)"

    def __arrow_array__(self, type: pa.DataType | None = None) -> pa.Array:
        return self.array if type is None or type == self.array.type else self.array.cast(type)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return np.asarray(list(self), dtype=dtype)  # what numpy makes of a list of str

    def to_pylist(self) -> list[str]:
        return self.array.to_pylist()
