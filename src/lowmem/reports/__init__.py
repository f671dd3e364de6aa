"""Reports: terminal renderables (and, later, the HTML report)."""
