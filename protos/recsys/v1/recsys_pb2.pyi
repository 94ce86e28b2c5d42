from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PromotionKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PROMOTION_KIND_UNSPECIFIED: _ClassVar[PromotionKind]
    PROMOTION_KIND_SPONSORED: _ClassVar[PromotionKind]
    PROMOTION_KIND_EDITORIAL: _ClassVar[PromotionKind]

class FallbackReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FALLBACK_REASON_UNSPECIFIED: _ClassVar[FallbackReason]
    FALLBACK_REASON_NO_HISTORY: _ClassVar[FallbackReason]
    FALLBACK_REASON_MODEL_UNAVAILABLE: _ClassVar[FallbackReason]
    FALLBACK_REASON_MODEL_TIMEOUT: _ClassVar[FallbackReason]
    FALLBACK_REASON_HISTORY_UNAVAILABLE: _ClassVar[FallbackReason]

class PopularityWindow(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    POPULARITY_WINDOW_ALL_TIME: _ClassVar[PopularityWindow]
    POPULARITY_WINDOW_RECENT: _ClassVar[PopularityWindow]
PROMOTION_KIND_UNSPECIFIED: PromotionKind
PROMOTION_KIND_SPONSORED: PromotionKind
PROMOTION_KIND_EDITORIAL: PromotionKind
FALLBACK_REASON_UNSPECIFIED: FallbackReason
FALLBACK_REASON_NO_HISTORY: FallbackReason
FALLBACK_REASON_MODEL_UNAVAILABLE: FallbackReason
FALLBACK_REASON_MODEL_TIMEOUT: FallbackReason
FALLBACK_REASON_HISTORY_UNAVAILABLE: FallbackReason
POPULARITY_WINDOW_ALL_TIME: PopularityWindow
POPULARITY_WINDOW_RECENT: PopularityWindow

class Filters(_message.Message):
    __slots__ = ("genres", "min_year", "max_year", "min_mean_rating", "exclude_movie_ids", "include_seen")
    GENRES_FIELD_NUMBER: _ClassVar[int]
    MIN_YEAR_FIELD_NUMBER: _ClassVar[int]
    MAX_YEAR_FIELD_NUMBER: _ClassVar[int]
    MIN_MEAN_RATING_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_MOVIE_IDS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_SEEN_FIELD_NUMBER: _ClassVar[int]
    genres: _containers.RepeatedScalarFieldContainer[str]
    min_year: int
    max_year: int
    min_mean_rating: float
    exclude_movie_ids: _containers.RepeatedScalarFieldContainer[int]
    include_seen: bool
    def __init__(self, genres: _Optional[_Iterable[str]] = ..., min_year: _Optional[int] = ..., max_year: _Optional[int] = ..., min_mean_rating: _Optional[float] = ..., exclude_movie_ids: _Optional[_Iterable[int]] = ..., include_seen: _Optional[bool] = ...) -> None: ...

class History(_message.Message):
    __slots__ = ("movie_ids", "ratings")
    MOVIE_IDS_FIELD_NUMBER: _ClassVar[int]
    RATINGS_FIELD_NUMBER: _ClassVar[int]
    movie_ids: _containers.RepeatedScalarFieldContainer[int]
    ratings: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, movie_ids: _Optional[_Iterable[int]] = ..., ratings: _Optional[_Iterable[float]] = ...) -> None: ...

class Rerank(_message.Message):
    __slots__ = ("mmr_lambda", "candidate_pool", "freshness_weight", "max_per_genre", "promotions")
    MMR_LAMBDA_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_POOL_FIELD_NUMBER: _ClassVar[int]
    FRESHNESS_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    MAX_PER_GENRE_FIELD_NUMBER: _ClassVar[int]
    PROMOTIONS_FIELD_NUMBER: _ClassVar[int]
    mmr_lambda: float
    candidate_pool: int
    freshness_weight: float
    max_per_genre: int
    promotions: _containers.RepeatedCompositeFieldContainer[Promotion]
    def __init__(self, mmr_lambda: _Optional[float] = ..., candidate_pool: _Optional[int] = ..., freshness_weight: _Optional[float] = ..., max_per_genre: _Optional[int] = ..., promotions: _Optional[_Iterable[_Union[Promotion, _Mapping]]] = ...) -> None: ...

class Promotion(_message.Message):
    __slots__ = ("movie_id", "position", "kind")
    MOVIE_ID_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    movie_id: int
    position: int
    kind: PromotionKind
    def __init__(self, movie_id: _Optional[int] = ..., position: _Optional[int] = ..., kind: _Optional[_Union[PromotionKind, str]] = ...) -> None: ...

class RecommendRequest(_message.Message):
    __slots__ = ("user_id", "history", "k", "filters", "rerank")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    FILTERS_FIELD_NUMBER: _ClassVar[int]
    RERANK_FIELD_NUMBER: _ClassVar[int]
    user_id: int
    history: History
    k: int
    filters: Filters
    rerank: Rerank
    def __init__(self, user_id: _Optional[int] = ..., history: _Optional[_Union[History, _Mapping]] = ..., k: _Optional[int] = ..., filters: _Optional[_Union[Filters, _Mapping]] = ..., rerank: _Optional[_Union[Rerank, _Mapping]] = ...) -> None: ...

class RecommendedItem(_message.Message):
    __slots__ = ("movie_id", "title", "genres", "year", "score", "explanation")
    MOVIE_ID_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    GENRES_FIELD_NUMBER: _ClassVar[int]
    YEAR_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    EXPLANATION_FIELD_NUMBER: _ClassVar[int]
    movie_id: int
    title: str
    genres: _containers.RepeatedScalarFieldContainer[str]
    year: int
    score: float
    explanation: str
    def __init__(self, movie_id: _Optional[int] = ..., title: _Optional[str] = ..., genres: _Optional[_Iterable[str]] = ..., year: _Optional[int] = ..., score: _Optional[float] = ..., explanation: _Optional[str] = ...) -> None: ...

class StageTimings(_message.Message):
    __slots__ = ("history_ms", "user_tower_ms", "retrieval_ms", "ranking_ms", "reranking_ms")
    HISTORY_MS_FIELD_NUMBER: _ClassVar[int]
    USER_TOWER_MS_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_MS_FIELD_NUMBER: _ClassVar[int]
    RANKING_MS_FIELD_NUMBER: _ClassVar[int]
    RERANKING_MS_FIELD_NUMBER: _ClassVar[int]
    history_ms: float
    user_tower_ms: float
    retrieval_ms: float
    ranking_ms: float
    reranking_ms: float
    def __init__(self, history_ms: _Optional[float] = ..., user_tower_ms: _Optional[float] = ..., retrieval_ms: _Optional[float] = ..., ranking_ms: _Optional[float] = ..., reranking_ms: _Optional[float] = ...) -> None: ...

class RecommendResponse(_message.Message):
    __slots__ = ("items", "model_version", "is_fallback", "fallback_reason", "latency_ms", "timings", "ignored_movie_ids", "history_length", "variant", "dropped_promotion_ids")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    IS_FALLBACK_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_REASON_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    IGNORED_MOVIE_IDS_FIELD_NUMBER: _ClassVar[int]
    HISTORY_LENGTH_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    DROPPED_PROMOTION_IDS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[RecommendedItem]
    model_version: str
    is_fallback: bool
    fallback_reason: FallbackReason
    latency_ms: float
    timings: StageTimings
    ignored_movie_ids: _containers.RepeatedScalarFieldContainer[int]
    history_length: int
    variant: str
    dropped_promotion_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, items: _Optional[_Iterable[_Union[RecommendedItem, _Mapping]]] = ..., model_version: _Optional[str] = ..., is_fallback: _Optional[bool] = ..., fallback_reason: _Optional[_Union[FallbackReason, str]] = ..., latency_ms: _Optional[float] = ..., timings: _Optional[_Union[StageTimings, _Mapping]] = ..., ignored_movie_ids: _Optional[_Iterable[int]] = ..., history_length: _Optional[int] = ..., variant: _Optional[str] = ..., dropped_promotion_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class SimilarRequest(_message.Message):
    __slots__ = ("movie_id", "k", "filters", "user_id", "rerank")
    MOVIE_ID_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    FILTERS_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    RERANK_FIELD_NUMBER: _ClassVar[int]
    movie_id: int
    k: int
    filters: Filters
    user_id: int
    rerank: Rerank
    def __init__(self, movie_id: _Optional[int] = ..., k: _Optional[int] = ..., filters: _Optional[_Union[Filters, _Mapping]] = ..., user_id: _Optional[int] = ..., rerank: _Optional[_Union[Rerank, _Mapping]] = ...) -> None: ...

class SimilarResponse(_message.Message):
    __slots__ = ("items", "model_version", "latency_ms")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[RecommendedItem]
    model_version: str
    latency_ms: float
    def __init__(self, items: _Optional[_Iterable[_Union[RecommendedItem, _Mapping]]] = ..., model_version: _Optional[str] = ..., latency_ms: _Optional[float] = ...) -> None: ...

class PopularRequest(_message.Message):
    __slots__ = ("k", "window", "filters")
    K_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    FILTERS_FIELD_NUMBER: _ClassVar[int]
    k: int
    window: PopularityWindow
    filters: Filters
    def __init__(self, k: _Optional[int] = ..., window: _Optional[_Union[PopularityWindow, str]] = ..., filters: _Optional[_Union[Filters, _Mapping]] = ...) -> None: ...

class PopularResponse(_message.Message):
    __slots__ = ("items", "latency_ms")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[RecommendedItem]
    latency_ms: float
    def __init__(self, items: _Optional[_Iterable[_Union[RecommendedItem, _Mapping]]] = ..., latency_ms: _Optional[float] = ...) -> None: ...

class BatchRecommendRequest(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[RecommendRequest]
    def __init__(self, requests: _Optional[_Iterable[_Union[RecommendRequest, _Mapping]]] = ...) -> None: ...

class Failure(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class BatchRecommendResult(_message.Message):
    __slots__ = ("index", "response", "failure")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    FAILURE_FIELD_NUMBER: _ClassVar[int]
    index: int
    response: RecommendResponse
    failure: Failure
    def __init__(self, index: _Optional[int] = ..., response: _Optional[_Union[RecommendResponse, _Mapping]] = ..., failure: _Optional[_Union[Failure, _Mapping]] = ...) -> None: ...

class BatchRecommendResponse(_message.Message):
    __slots__ = ("results", "latency_ms")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[BatchRecommendResult]
    latency_ms: float
    def __init__(self, results: _Optional[_Iterable[_Union[BatchRecommendResult, _Mapping]]] = ..., latency_ms: _Optional[float] = ...) -> None: ...

class RecordInteractionRequest(_message.Message):
    __slots__ = ("user_id", "movie_id", "rating", "timestamp_s")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    MOVIE_ID_FIELD_NUMBER: _ClassVar[int]
    RATING_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_S_FIELD_NUMBER: _ClassVar[int]
    user_id: int
    movie_id: int
    rating: float
    timestamp_s: int
    def __init__(self, user_id: _Optional[int] = ..., movie_id: _Optional[int] = ..., rating: _Optional[float] = ..., timestamp_s: _Optional[int] = ...) -> None: ...

class RecordInteractionResponse(_message.Message):
    __slots__ = ("created", "history_length", "timestamp_s")
    CREATED_FIELD_NUMBER: _ClassVar[int]
    HISTORY_LENGTH_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_S_FIELD_NUMBER: _ClassVar[int]
    created: bool
    history_length: int
    timestamp_s: int
    def __init__(self, created: _Optional[bool] = ..., history_length: _Optional[int] = ..., timestamp_s: _Optional[int] = ...) -> None: ...

class DeleteUserRequest(_message.Message):
    __slots__ = ("user_id",)
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: int
    def __init__(self, user_id: _Optional[int] = ...) -> None: ...

class DeleteUserResponse(_message.Message):
    __slots__ = ("interactions_deleted", "request_log_rows_deleted")
    INTERACTIONS_DELETED_FIELD_NUMBER: _ClassVar[int]
    REQUEST_LOG_ROWS_DELETED_FIELD_NUMBER: _ClassVar[int]
    interactions_deleted: int
    request_log_rows_deleted: int
    def __init__(self, interactions_deleted: _Optional[int] = ..., request_log_rows_deleted: _Optional[int] = ...) -> None: ...
