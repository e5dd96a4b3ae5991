"""Recording the shapes of the outputs an op module allocates (NaN-poisoned by conftest's fixture)."""


def record_allocations(monkeypatch, module) -> list[tuple[int, ...]]:
    """Patch ``module.new_output`` to append each allocation's shape to the returned list."""
    shapes, new_output = [], module.new_output

    def recording(like, shape, dtype=None):
        shapes.append(tuple(shape))
        return new_output(like, shape, dtype)

    monkeypatch.setattr(module, "new_output", recording)
    return shapes
