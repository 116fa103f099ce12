"""FeatureSpec: what a backbone, an env or an agent needs to know about the features."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class FeatureSpec:
    """Names and sizes of the features of a SessionLog.

    ``cardinalities[f]`` is the vocabulary size of sparse field ``f`` INCLUDING index 0,
    which means "unknown" (unseen in the train split, or missing); an embedding table for
    the field has exactly that many rows.
    ``user_field`` / ``item_field`` / ``author_field`` name the sparse fields that hold
    those ids where the source has them (personalised gates use them); None otherwise.
    """

    source: str
    sparse_fields: list[str]
    cardinalities: list[int]
    dense_fields: list[str]
    tasks: list[str]
    user_field: str | None = None
    item_field: str | None = None
    author_field: str | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.sparse_fields) != len(self.cardinalities):
            raise ValueError("sparse_fields and cardinalities differ in length")
        for role in ("user_field", "item_field", "author_field"):
            name = getattr(self, role)
            if name is not None and name not in self.sparse_fields:
                raise ValueError(f"{role} '{name}' is not a sparse field")

    @property
    def num_sparse(self) -> int:
        return len(self.sparse_fields)

    @property
    def num_dense(self) -> int:
        return len(self.dense_fields)

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def field_index(self, name: str) -> int:
        return self.sparse_fields.index(name)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "FeatureSpec":
        return cls(**data)
