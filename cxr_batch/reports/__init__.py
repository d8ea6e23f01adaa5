"""Numbers and pictures from predictions: metrics, plots, the report."""
