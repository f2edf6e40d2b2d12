//! Routes: `[[routes]]` of the configuration file.

/// One `[[routes]]` entry, validated (names, filters, sources parsed). File order is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteSpec {
    pub name: String,
    pub topics: Vec<String>,
    pub table: String,
    pub key: Vec<String>,
    pub on_conflict: OnConflict,
    pub columns: Vec<(String, Source)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnConflict {
    #[default]
    Nothing,
    Update,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    TopicSegment(usize),
    Topic,
    Payload,
    JsonPath(Vec<PathStep>),
    Timestamp,
    ReceivedAt,
    WrittenBy,
    LeaseEpoch,
    DeviceId,
    Literal(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathStep {
    Key(String),
    Index(usize),
}
