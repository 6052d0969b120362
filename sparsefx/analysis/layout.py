"""Where a compact tensor keeps its channels: one dim made of pieces of channel spaces.

A dim of a dense tensor is a concatenation of *pieces*. A piece is either a channel space
(a group, or during analysis a producer's space) whose channel ``c`` owns the ``block``
consecutive features ``c*block .. c*block+block-1`` of the piece (a flatten turns one conv
channel into its block of spatial features), or a stretch of dense features that is always
kept. A compact tensor holds, along that dim, only the features of kept channels, piece
after piece: a residual add of two tensors of one group is a one-piece layout, a concat of
two groups a two-piece layout with offsets.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

__all__ = ["Layout", "Piece"]


@dataclass(frozen=True)
class Piece:
    group: str | None
    """The channel space, or None for dense features."""
    size: int
    """Channels of the space (for dense features: how many)."""
    block: int = 1
    """Consecutive features per channel along the dim (1 for dense features)."""

    @property
    def features(self) -> int:
        return self.size * self.block


@dataclass(frozen=True)
class Layout:
    dim: int
    pieces: tuple[Piece, ...]

    @staticmethod
    def of(group: str, dim: int, size: int) -> Layout:
        return Layout(dim, (Piece(group, size),))

    @property
    def full(self) -> int:
        """Dense size of `dim`."""
        return sum(p.features for p in self.pieces)

    @property
    def groups(self) -> list[str]:
        """The spaces in this layout, in order, without repeats."""
        return list(dict.fromkeys(p.group for p in self.pieces if p.group is not None))

    def offsets(self) -> list[int]:
        """Feature offset of each piece along `dim`."""
        starts = [0]
        for piece in self.pieces[:-1]:
            starts.append(starts[-1] + piece.features)
        return starts

    def at(self, dim: int) -> Layout:
        return replace(self, dim=dim)

    def scaled(self, factor: int) -> Layout:
        """The layout after merging `factor` trailing features into each feature (flatten)."""
        return Layout(self.dim, tuple(_scale(p, factor) for p in self.pieces))

    def divided(self, factor: int) -> Layout | None:
        """The layout of the outer dim after splitting each feature's block of `factor` off
        into new inner dims (unflatten), or None if a channel's block does not divide."""
        pieces = []
        for piece in self.pieces:
            if piece.group is None:
                if piece.size % factor:
                    return None
                pieces.append(Piece(None, piece.size // factor))
            elif piece.block % factor:
                return None
            else:
                pieces.append(Piece(piece.group, piece.size, piece.block // factor))
        return Layout(self.dim, tuple(pieces))

    def same_shape(self, other: Layout) -> bool:
        """Same dim and the same piece sizes and blocks: joinable feature by feature."""
        return self.dim == other.dim and [
            (p.size, p.block, p.group is None) for p in self.pieces
        ] == [(p.size, p.block, p.group is None) for p in other.pieces]

    def renamed(self, names: dict[str, str | None]) -> Layout | None:
        """Spaces renamed to their groups; spaces mapped to None become dense features.
        None if nothing in the layout is pruned."""
        pieces: list[Piece] = []
        for piece in self.pieces:
            group = names.get(piece.group) if piece.group is not None else None
            if group is None:
                dense = Piece(None, piece.features)
                if pieces and pieces[-1].group is None:
                    dense = Piece(None, pieces.pop().size + dense.size)
                pieces.append(dense)
            else:
                pieces.append(Piece(group, piece.size, piece.block))
        if all(p.group is None for p in pieces):
            return None
        return Layout(self.dim, tuple(pieces))


def _scale(piece: Piece, factor: int) -> Piece:
    if piece.group is None:
        return Piece(None, piece.size * factor)
    return Piece(piece.group, piece.size, piece.block * factor)
