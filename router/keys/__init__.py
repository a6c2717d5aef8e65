"""Client keys: who may call, which models, at what rate (`ring`), and the budgets' books
(`ledger`); docs/keys-and-budgets.md."""
