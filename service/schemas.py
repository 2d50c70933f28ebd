"""Request and response models of the HTTP API."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_K = 100
MAX_CANDIDATES = 1000
MAX_QUERY_CHARS = 2000  # far beyond what the text model reads (it truncates, and says so)


FILTER_DOC = ("only photos that match: {\"must\": [...], \"should\": [...], \"must_not\": [...]} of conditions "
              "{\"key\": FIELD, \"match\": {\"value\": V} | {\"any\": [V, ...]}}, {\"key\": FIELD, \"range\": "
              "{\"gte\": A, \"lt\": B}} (numbers, ISO dates) or {\"key\": FIELD, \"prefix\": \"a/b\"} "
              "(see docs/filters.md; `alignsearch index info` lists the fields)")


class SearchParams(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    k: int = Field(10, ge=1, le=MAX_K, description="results to return")
    candidates: int = Field(100, ge=1, le=MAX_CANDIDATES, description="first-stage candidates to rerank")
    offset: int = Field(0, ge=0, le=MAX_CANDIDATES - 1,
                        description="ranks to skip: offset=k gives page 2 of the same ranking (the candidates grow to "
                                    "offset + k when fewer; offset + k at most %d)" % MAX_CANDIDATES)
    filter: dict[str, Any] | None = Field(None, description=FILTER_DOC)

    @field_validator("filter", mode="before")
    @classmethod
    def _filter_json(cls, value: Any) -> Any:
        """A multipart form carries the filter as JSON text."""
        if isinstance(value, str):
            try:
                return json.loads(value)
            except ValueError:
                raise ValueError("filter is not valid JSON") from None
        return value

    @model_validator(mode="after")
    def _candidates_cover_k(self) -> SearchParams:
        if self.candidates < self.k:
            raise ValueError(f"candidates ({self.candidates}) must be >= k ({self.k})")
        if self.offset + self.k > MAX_CANDIDATES:
            raise ValueError(f"offset + k must be at most {MAX_CANDIDATES}")
        return self

    @property
    def ranked(self) -> int:
        """Candidates the search reranks: ``candidates``, or ``offset + k`` when more."""
        return max(self.candidates, self.offset + self.k)


class Page(BaseModel):
    offset: int = Field(0, description="the rank of the first result, less one")
    total: int | None = Field(None, description="items the search ranked from: the photos (or captions) the filter "
                                                "allows, or all")
    has_more: bool = Field(False, description="more results follow this page")
    next_offset: int | None = Field(None, description="the offset of the next page (null when there is none)")


# what the upload routes decode (base64.b64decode(validate=True)), stated in the schema: the standard alphabet,
# padding only at the end, and at least one 4-character group
BASE64_PATTERN = r"^[A-Za-z0-9+/]*={0,2}$"
BASE64_MIN = 4


class TextSearchRequest(SearchParams):
    query: str = Field(..., min_length=1, max_length=MAX_QUERY_CHARS, pattern=r"\S",
                       description="the sentence to search images for (not blank)")
    explain: bool = Field(False, description="add, per result, each query word's best-matching region")
    min_score: float | None = Field(
        None, ge=-1.0, le=1.0, allow_inf_nan=False,
        description="a fixed threshold on global_score (cosine of the query and the image) instead of the "
                    "model's own test: results below it are weak matches (match: false). Default (null): the "
                    "model's reference test (see match), which adapts to each query and any collection")

    @field_validator("query")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("query is empty")
        return value.strip()


class ImageSearchFields(SearchParams):
    explain: bool = Field(False, description="add, per result, each caption word's best-matching region")


class ImageSearchJSON(ImageSearchFields):
    image_base64: str = Field(..., min_length=BASE64_MIN, pattern=BASE64_PATTERN,
                              description="the image file's bytes, base64-encoded (standard alphabet, no line breaks)")


class SimilarFields(BaseModel):
    """A "more like this" search: ranked photos like an indexed photo (``id``) or an uploaded one."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    k: int = Field(10, ge=1, le=MAX_K, description="results to return")
    offset: int = Field(0, ge=0, le=MAX_CANDIDATES - 1, description="ranks to skip (offset=k: page 2)")
    filter: dict[str, Any] | None = Field(None, description=FILTER_DOC)
    _filter_json = field_validator("filter", mode="before")(SearchParams._filter_json.__func__)

    @model_validator(mode="after")
    def _page_fits(self) -> SimilarFields:
        if self.offset + self.k > MAX_CANDIDATES:
            raise ValueError(f"offset + k must be at most {MAX_CANDIDATES}")
        return self

    @property
    def ranked(self) -> int:
        return self.offset + self.k + 1  # the query's own photo may be among them


class SimilarJSON(SimilarFields):
    id: str | None = Field(None, min_length=1, max_length=4096, description="an indexed photo's id")
    image_base64: str | None = Field(None, min_length=BASE64_MIN, pattern=BASE64_PATTERN,
                                     description="or a photo's bytes, base64-encoded (standard alphabet, no line "
                                                 "breaks)")

    @model_validator(mode="after")
    def _one_query(self) -> SimilarJSON:
        if (self.id is None) == (self.image_base64 is None):
            raise ValueError("give exactly one of id and image_base64")
        return self


class Grounding(BaseModel):
    """Where one word of the text matched in the image: whole words only, no stopwords or punctuation."""

    word: str = Field(description="a whole word (word pieces merged), lower case")
    region: int = Field(description="region index (row-major grid cell, or box index)")
    similarity: float = Field(description="the word's cosine similarity with the region (mean over its pieces)")
    confidence: float | None = Field(None, description="probability of this region under a softmax over the "
                                     "image's regions (temperature 0.05): near 1 when one region stands out, "
                                     "1/regions when none does")
    cell: list[int] | None = Field(None, description="[row, col] of the grid cell")
    grid: list[int] | None = Field(None, description="[rows, cols] of the region grid")


class Timings(BaseModel):
    encode: float
    coarse: float
    rerank: float
    total: float


def _match():
    return Field(None, description="true: a match (global_score >= the response's min_score); false: a weak hit, "
                 "the closest there is but not what was asked for; null: no match test applies")


def _relevance():
    return Field(None, ge=0.0, le=100.0, description="how much this result stands out for this query: the percent "
                 "of the model's generic reference items (1,000 photos for a text query, 1,000 captions for an "
                 "image query) whose global score with the query is lower: the same scale on any collection; a "
                 "match stands out from nearly all of them; null: the model has no reference bank")


class MatchFields(BaseModel):
    """How strong the results are, the same way for text and image queries."""

    min_score: float | None = Field(None, description="the threshold on global_score applied to this query: the "
                                    "request's min_score; else the model's match test's threshold for this query "
                                    "(from its scores against the model's reference items and, where the test "
                                    "has one, how far a result stands out from the rest of the collection "
                                    "searched); else the model's fixed min_score; null: none")
    match_test: str | None = Field(None, description="what set min_score: 'reference' (the model's match test), "
                                   "'min_score' (a fixed threshold: the request's, or an older model's) or null "
                                   "(no test: match is null)")
    no_match: bool = Field(False, description="no result is a match: nothing in the index matches the query")


class ImageResult(BaseModel):
    rank: int
    id: str
    score: float
    global_score: float
    local_score: float
    uri: str
    metadata: dict
    grounding: list[Grounding] | None = None
    match: bool | None = _match()
    relevance: float | None = _relevance()


class TextSearchResponse(Page, MatchFields):
    query: str
    results: list[ImageResult]
    timings_ms: Timings
    truncated: bool = Field(False, description="the query was cut to the text model's token limit")


class CaptionResult(BaseModel):
    rank: int
    id: str
    caption: str
    image_id: str | None
    score: float
    global_score: float
    local_score: float
    metadata: dict = {}
    grounding: list[Grounding] | None = None
    match: bool | None = _match()
    relevance: float | None = _relevance()


class ImageSearchResponse(Page, MatchFields):
    results: list[CaptionResult]
    timings_ms: Timings


class SimilarSearchResponse(Page):
    """Photos ranked by global score with the query photo. Each result's match and relevance are null: the
    match test and the reference bank measure text-photo and photo-caption scores, not photo-photo ones."""

    results: list[ImageResult]
    timings_ms: Timings


class Written(BaseModel):
    id: str = Field(description="the photo's id (uploads/<content hash>.<ext>: the same photo twice is one photo)")
    uri: str
    created: bool = Field(description="false when this photo was already indexed (its captions and fields added)")
    metadata: dict = Field(default_factory=dict, description="its fields as searches show them")


class Deleted(BaseModel):
    id: str
    captions_deleted: int


class Ready(BaseModel):
    status: str
    index: str | None = Field(None, description="the index folder's name (with the API key, when one is set)")
    model_fingerprint: str | None = Field(None, description="(with the API key, when one is set)")
    images: int | None = None
    captions: int | None = None


class Reloaded(BaseModel):
    swapped: bool = Field(description="a new version of the index was opened and is now served")
    images: int
    captions: int
    error: str | None = Field(None, description="why the newest version on disk could not be opened, if so")
