"""The entry points, orchestration only: the Prefect flow (``flows.tlcm``) and the ``tlcm`` command
(``flows.cli``). They call the stages (``tasks``), the commands around them (``tools``) and the
library (``tlcm``); nothing imports them."""
