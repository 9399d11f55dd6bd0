class LowbitError(Exception):
    """An error the user can act on: the CLI prints its message on one line and exits 2."""


class StructureError(LowbitError):
    """The captured graph has a shape the analysis does not understand."""

    def __init__(self, node, expected: str):
        name = getattr(node, "name", node)
        super().__init__(f"unsupported structure at node '{name}': expected {expected}")
        self.node = name
