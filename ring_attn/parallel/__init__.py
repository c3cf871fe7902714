"""Sequence-parallel strategies beside the ring: Ulysses (all-to-all over heads) and the
2-D hybrid (Ulysses inside each row of a mesh, the ring across)."""
