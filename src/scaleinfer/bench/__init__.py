"""Built-in benchmarks behind `scaleinfer bench`: same machine, same run, same threads, ratios."""
