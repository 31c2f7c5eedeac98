"""Tables, figures, claim verdicts and REPORT.md, pure functions of the results table. Imports t2i and below."""
