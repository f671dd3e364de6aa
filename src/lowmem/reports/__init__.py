"""Reports: rich renderables for the terminal (`terminal`), the self-contained HTML report
(`html`) and its figures (`figures`), from a run folder read back (`run`)."""
