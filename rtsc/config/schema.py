"""The whole configuration: one frozen dataclass per YAML section."""

from __future__ import annotations

from dataclasses import dataclass, field

from rtsc.config.intake import (AssemblerConfig, MultiEchoConfig, ReceiverConfig,
                                SeriesFilterConfig, WatcherConfig)
from rtsc.config.output import HistoryConfig, PublishConfig, SessionConfig
from rtsc.config.pipeline import (GlmConfig, MotionConfig, PhysioConfig, PipelineConfig,
                                  SpinalCordConfig)
from rtsc.config.qc import QcConfig
from rtsc.config.simulator import DemoConfig, SimulatorConfig
from rtsc.config.web import WebConfig
from rtsc.errors import ConfigError


@dataclass(frozen=True)
class Config:
    """The whole configuration."""

    receiver: ReceiverConfig = field(default_factory=ReceiverConfig)
    watcher: WatcherConfig = field(default_factory=WatcherConfig)
    assembler: AssemblerConfig = field(default_factory=AssemblerConfig)
    series_filter: SeriesFilterConfig = field(default_factory=SeriesFilterConfig)
    multi_echo: MultiEchoConfig = field(default_factory=MultiEchoConfig)
    publish: PublishConfig = field(default_factory=PublishConfig)
    session: SessionConfig = field(default_factory=SessionConfig)
    history: HistoryConfig = field(default_factory=HistoryConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    motion: MotionConfig = field(default_factory=MotionConfig)
    spinal_cord: SpinalCordConfig = field(default_factory=SpinalCordConfig)
    glm: GlmConfig = field(default_factory=GlmConfig)
    physio: PhysioConfig = field(default_factory=PhysioConfig)
    qc: QcConfig = field(default_factory=QcConfig)
    simulator: SimulatorConfig = field(default_factory=SimulatorConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    web: WebConfig = field(default_factory=WebConfig)

    def __post_init__(self) -> None:
        if self.glm.n_volumes is not None and self.glm.n_volumes > self.session.max_volumes:
            raise ConfigError(f"glm.n_volumes: {self.glm.n_volumes} is more than "
                              f"session.max_volumes ({self.session.max_volumes})")
        if self.pipeline.plugins and self.pipeline.mode != "brain":
            raise ConfigError(f"pipeline.plugins: plugins run in brain mode only (pipeline.mode "
                              f"is {self.pipeline.mode!r})")
        if self.glm.feedback == "plugin" and not self.pipeline.plugins:
            raise ConfigError("glm.feedback: plugin, but pipeline.plugins is empty")

