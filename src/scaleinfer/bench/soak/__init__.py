"""`scaleinfer bench soak`: a long mixed-traffic run against a real server that checks it holds.

    mix.py      the request mix: valid chat / completions (streaming or not, some cut mid-stream)
                and malformed requests of every kind, drawn from a seeded generator
    client.py   sends one drawn request over HTTP and records what came back
    server.py   starts / stops `scaleinfer serve`, reads /metrics, samples the server's RSS
    report.py   the numbers (percentiles, RSS slope), the verdict, the table
    run.py      the command: flags, the timed run of N concurrent clients, the JSON record
"""
