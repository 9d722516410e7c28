"""Expert-parallel serving tests (a package, so their Ray workers are released when these tests end)."""
