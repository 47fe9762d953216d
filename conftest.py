"""pytest configuration shared by the tests and by nbval's notebook runs."""


def pytest_collectstart(collector):
    """nbval: never compare stderr (progress bars, warnings); stdout and results still count."""
    try:
        from nbval.plugin import IPyNbFile
    except ImportError:
        return
    if isinstance(collector, IPyNbFile):
        collector.skip_compare = tuple(collector.skip_compare) + ("stderr",)
