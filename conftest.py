"""pytest configuration shared by the tests and by nbval's notebook runs."""

# Seconds nbval waits for a cell's outputs once the kernel has answered. nbval hard-codes 5 s and
# has no option for it; on a loaded machine (make test runs two processes on two cores) a cell
# that displays figures or sound can take longer to flush them, and nbval then fails a cell that
# ran correctly ("Timeout of 5 seconds exceeded waiting for output", seen once in CI in lesson 5).
NBVAL_OUTPUT_TIMEOUT = 120


def pytest_collectstart(collector):
    """nbval: never compare stderr (progress bars, warnings); stdout and results still count."""
    try:
        from nbval.plugin import IPyNbFile
    except ImportError:
        return
    if isinstance(collector, IPyNbFile):
        collector.skip_compare = tuple(collector.skip_compare) + ("stderr",)


def pytest_itemcollected(item):
    """nbval: wait up to NBVAL_OUTPUT_TIMEOUT seconds for a cell's outputs instead of 5."""
    if hasattr(item, "output_timeout"):
        item.output_timeout = max(item.output_timeout, NBVAL_OUTPUT_TIMEOUT)
