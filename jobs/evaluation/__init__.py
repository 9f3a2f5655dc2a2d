"""How good the published lists are: the literature's protocols (`evaluate`), the backtest of the real
nightly run (`backtest`), similar-item and session quality (`item_quality`) and the ranking metrics they
and the promotion gate share (`jobs.steps.ranking_metrics`)."""
