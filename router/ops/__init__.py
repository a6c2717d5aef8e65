"""Operations: serving, the gateway's assembly, reload, workers, metrics and logs."""
