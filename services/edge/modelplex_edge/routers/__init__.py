"""One router per endpoint family; routers only dispatch."""
