// Tests of server/regions/tensor_ref.h: turning a tensor a request names into a pointer only after checking, without
// overflow, that dtype and shape are the documented ones and every byte lies in a live region
// the request may use.
#include "server/regions/tensor_ref.h"


#include <gtest/gtest.h>

#include <cstdint>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "kernels/paged_kv.h"
#include "server/regions/region.h"
#include "tests/unit/unit_test_util.h"

namespace attnd {
namespace {

constexpr kernels::DType kF16 = kernels::DType::kFloat16;
constexpr kernels::DType kBf16 = kernels::DType::kBFloat16;
constexpr kernels::DType kF32 = kernels::DType::kFloat32;
constexpr uint64_t kMax = std::numeric_limits<uint64_t>::max();

// A region over test-owned memory. Kind and device are chosen by the test, so CUDA placement
// rules can be checked without a GPU (nothing dereferences the memory here).
class FakeRegion final : public Region {
 public:
  FakeRegion(std::string name, Kind kind, int device, uint64_t bytes)
      : Region(std::move(name), kind, device, nullptr, bytes) {}
  std::string source() const override { return "fake"; }
};

// Host memory the region's base points at, for checks of the resolved pointer.
class HostBackedRegion final : public Region {
 public:
  HostBackedRegion(std::string name, std::vector<uint8_t>* memory)
      : Region(std::move(name), Kind::kHost, -1, memory->data(), memory->size()) {}
  std::string source() const override { return "vector"; }
};

TensorName Ref(const std::string& region, uint64_t offset, std::optional<kernels::DType> dtype,
               const std::vector<uint64_t>& shape) {
  TensorName ref;
  ref.region = region;
  ref.offset = offset;
  ref.dtype = dtype;
  ref.shape.assign(shape.begin(), shape.end());
  return ref;
}

bool Names(const absl::Status& s, absl::string_view word) {
  return s.message().find(word) != absl::string_view::npos;
}

class TensorRefTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(regions_.Add(std::make_shared<HostBackedRegion>("host", &memory_)).ok());
    ASSERT_TRUE(
        regions_.Add(std::make_shared<FakeRegion>("gpu1", Region::Kind::kCuda, 1, 1 << 20)).ok());
  }

  absl::StatusOr<ResolvedTensor> Resolve(const TensorName& ref,
                                         const std::vector<uint64_t>& shape,
                                         kernels::DType dtype = kBf16,
                                         Placement placement = Placement{true, -1}) {
    return ResolveTensor(regions_, ref, "q", dtype, shape, placement);
  }

  std::vector<uint8_t> memory_ = std::vector<uint8_t>(4096);
  RegionRegistry regions_;
};

TEST_F(TensorRefTest, AnInBoundsTensorResolvesToBasePlusOffsetAndHoldsItsRegion) {
  const long holders = regions_.Find("host").use_count();
  auto t = Resolve(Ref("host", 64, kBf16, {3, 2, 8}), {3, 2, 8});
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(t->data, memory_.data() + 64);
  EXPECT_EQ(t->offset, 64u);
  EXPECT_EQ(t->bytes, 3u * 2 * 8 * 2);
  EXPECT_EQ(t->region, regions_.Find("host"));
  EXPECT_EQ(regions_.Find("host").use_count(), holders + 1);
}

TEST_F(TensorRefTest, ATensorEndingExactlyAtTheRegionsEndIsAccepted) {
  auto t = Resolve(Ref("host", 4096 - 4 * 8, kF32, {8}), {8}, kF32);
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(t->bytes, 32u);
}

TEST_F(TensorRefTest, AnEmptyRegionNameIsInvalidArgumentNamingTheField) {
  auto t = Resolve(Ref("", 0, kBf16, {4}), {4});
  EXPECT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument) << t.status();
  EXPECT_TRUE(Names(t.status(), "q.region")) << t.status();
}

TEST_F(TensorRefTest, AnUnknownRegionIsNotFoundNamingTheFieldAndTheRegion) {
  auto t = Resolve(Ref("nope", 0, kBf16, {4}), {4});
  EXPECT_EQ(t.status().code(), absl::StatusCode::kNotFound) << t.status();
  EXPECT_TRUE(Names(t.status(), "q.region")) << t.status();
  EXPECT_TRUE(Names(t.status(), "nope")) << t.status();
}

TEST_F(TensorRefTest, ARemovedRegionIsNotFound) {
  ASSERT_TRUE(regions_.Remove("host").ok());
  auto t = Resolve(Ref("host", 0, kBf16, {4}), {4});
  EXPECT_EQ(t.status().code(), absl::StatusCode::kNotFound) << t.status();
}

TEST_F(TensorRefTest, AWrongDtypeIsInvalidArgumentNamingDtypeAndBothTypes) {
  for (std::optional<kernels::DType> wrong :
       {std::optional<kernels::DType>(), std::optional(kF16), std::optional(kF32)}) {
    auto t = Resolve(Ref("host", 0, wrong, {4}), {4});
    EXPECT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument) << t.status();
    EXPECT_TRUE(Names(t.status(), "q.dtype")) << t.status();
    EXPECT_TRUE(Names(t.status(), "bfloat16")) << t.status();
  }
}

TEST_F(TensorRefTest, AWrongShapeIsInvalidArgumentNamingShapeAndTheExpectedShape) {
  const std::vector<uint64_t> want = {3, 2, 8};
  for (const std::vector<uint64_t>& shape :
       {std::vector<uint64_t>{3, 2, 7}, {2, 2, 8}, {3, 2}, {3, 2, 8, 1}, {}, {48}, {8, 2, 3}}) {
    auto t = Resolve(Ref("host", 0, kBf16, shape), want);
    EXPECT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument) << t.status();
    EXPECT_TRUE(Names(t.status(), "q.shape")) << t.status();
    EXPECT_TRUE(Names(t.status(), "[3, 2, 8]")) << t.status();
  }
}

TEST_F(TensorRefTest, BytesPastTheRegionsEndAreInvalidArgumentNamingTheRegionSize) {
  for (auto [offset, n] : {std::pair<uint64_t, uint64_t>{0, 2049}, {2, 2048}, {4096, 1},
                           {4094, 2}, {1 << 20, 1}}) {
    SCOPED_TRACE(testing::Message() << "offset " << offset << " n " << n);
    auto t = Resolve(Ref("host", offset, kBf16, {n}), {n});
    EXPECT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument) << t.status();
    EXPECT_TRUE(Names(t.status(), "q")) << t.status();
    EXPECT_TRUE(Names(t.status(), "4096")) << t.status();
  }
}

TEST_F(TensorRefTest, OffsetsNear2To64AreRejectedNotWrapped) {
  // offset + bytes wraps to a small number if added without overflow checks.
  for (uint64_t offset : {kMax - 1, kMax - 15, uint64_t{1} << 63, kMax - 4095}) {
    SCOPED_TRACE(offset);
    auto t = Resolve(Ref("host", offset, kBf16, {8}), {8});
    EXPECT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument) << t.status();
  }
}

TEST_F(TensorRefTest, ShapesWhoseByteSizeOverflowsAreRejectedNotWrapped) {
  // Each of these byte sizes, computed modulo 2^64, is small enough to fit the region.
  const std::vector<std::vector<uint64_t>> shapes = {
      {(uint64_t{1} << 63) + 1, 2},           // 2 * that * 2 bytes wraps to 4... bytes
      {uint64_t{1} << 32, uint64_t{1} << 31},  // 2^63 elements * 2 bytes wraps to 0
      {kMax, kMax},                            // wraps to 1 element
      {uint64_t{1} << 63},                     // 2^64 bytes wraps to 0
      {3, 0x5555555555555556ull},              // 3 * that wraps to 2 elements
  };
  for (const std::vector<uint64_t>& shape : shapes) {
    SCOPED_TRACE(testing::PrintToString(shape));
    auto t = Resolve(Ref("host", 0, kBf16, shape), shape);
    EXPECT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument) << t.status();
    EXPECT_TRUE(Names(t.status(), "q")) << t.status();
  }
}

TEST_F(TensorRefTest, AnEmptyTensorIsAcceptedAnywhereInsideTheRegion) {
  auto t = Resolve(Ref("host", 4096, kBf16, {0, 8}), {0, 8});
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(t->bytes, 0u);
}

TEST_F(TensorRefTest, AnOffsetThatIsNotAMultipleOfTheDtypeSizeIsInvalidArgument) {
  for (auto [dtype, offset] : {std::pair{kBf16, uint64_t{1}},
                               {kF16, uint64_t{3}},
                               {kF32, uint64_t{2}},
                               {kF32, uint64_t{6}},
                               {kF32, kMax}}) {
    SCOPED_TRACE(testing::Message() << DTypeName(dtype) << " offset " << offset);
    auto t = Resolve(Ref("host", offset, dtype, {4}), {4}, dtype);
    EXPECT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument) << t.status();
    EXPECT_TRUE(Names(t.status(), "q.offset")) << t.status();
  }
}

TEST_F(TensorRefTest, AHostRegionIsRejectedWhenThePlacementWantsCudaMemory) {
  auto t = Resolve(Ref("host", 0, kBf16, {4}), {4}, kBf16,
                   Placement{false, 0});
  EXPECT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument) << t.status();
  EXPECT_TRUE(Names(t.status(), "q.region")) << t.status();
  EXPECT_TRUE(Names(t.status(), "host")) << t.status();
}

TEST_F(TensorRefTest, ACudaRegionIsRejectedByAHostOnlyPlacement) {
  auto t = Resolve(Ref("gpu1", 0, kBf16, {4}), {4});
  EXPECT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument) << t.status();
  EXPECT_TRUE(Names(t.status(), "q.region")) << t.status();
}

TEST_F(TensorRefTest, ACudaRegionOnAnotherDeviceIsRejected) {
  auto t = Resolve(Ref("gpu1", 0, kBf16, {4}), {4}, kBf16,
                   Placement{false, 0});
  EXPECT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument) << t.status();
  EXPECT_TRUE(Names(t.status(), "q.region")) << t.status();
}

TEST_F(TensorRefTest, ACudaRegionOnTheRequestsDeviceIsAccepted) {
  auto t = Resolve(Ref("gpu1", 1024, kBf16, {4}), {4}, kBf16,
                   Placement{false, 1});
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(t->offset, 1024u);
  EXPECT_EQ(t->bytes, 8u);
}

TEST_F(TensorRefTest, TheFieldNameInEveryMessageIsTheCallersField) {
  auto t = ResolveTensor(regions_, Ref("host", 1, kBf16, {4}), "lse",
                         kBf16, {4}, Placement{});
  EXPECT_TRUE(Names(t.status(), "lse.offset")) << t.status();
}

// ---- Overlaps ----

TEST(ResolvedTensorOverlapTest, OverlapsOnlyWhenByteRangesOfTheSameRegionIntersect) {
  auto a = std::make_shared<FakeRegion>("a", Region::Kind::kHost, -1, 1024);
  auto b = std::make_shared<FakeRegion>("b", Region::Kind::kHost, -1, 1024);
  auto T = [](std::shared_ptr<Region> r, uint64_t offset, uint64_t bytes) {
    ResolvedTensor t;
    t.region = std::move(r);
    t.offset = offset;
    t.bytes = bytes;
    return t;
  };
  struct Case {
    ResolvedTensor x, y;
    bool overlaps;
  };
  const Case cases[] = {
      {T(a, 0, 100), T(a, 50, 100), true},    // partial
      {T(a, 0, 100), T(a, 10, 10), true},     // contains
      {T(a, 0, 100), T(a, 0, 100), true},     // same
      {T(a, 99, 1), T(a, 0, 100), true},      // last byte
      {T(a, 0, 100), T(a, 100, 100), false},  // adjacent
      {T(a, 100, 100), T(a, 0, 100), false},  // adjacent, other order
      {T(a, 0, 100), T(b, 0, 100), false},    // other region
      {T(a, 0, 0), T(a, 0, 100), false},      // empty
      {T(a, 50, 0), T(a, 0, 100), false},     // empty inside
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(testing::Message() << c.x.region->name() << "[" << c.x.offset << ", +"
                                    << c.x.bytes << ") vs " << c.y.region->name() << "["
                                    << c.y.offset << ", +" << c.y.bytes << ")");
    EXPECT_EQ(c.x.Overlaps(c.y), c.overlaps);
    EXPECT_EQ(c.y.Overlaps(c.x), c.overlaps);  // symmetric
  }
}

TEST(ResolvedTensorOverlapTest, TwoHostRegionsOnOneObjectOverlapWhereTheirObjectBytesDo) {
  testing_util::ShmObject object(3 * 4096);
  // Region x maps the object from byte 4096, region y from byte 0.
  auto x = HostRegion::Open("x", object.key(), 4096, 8192);
  auto y = HostRegion::Open("y", object.key(), 0, 3 * 4096);
  ASSERT_TRUE(x.ok() && y.ok());
  std::shared_ptr<Region> rx = *std::move(x), ry = *std::move(y);
  auto T = [](std::shared_ptr<Region> r, uint64_t offset, uint64_t bytes) {
    ResolvedTensor t;
    t.region = std::move(r);
    t.offset = offset;
    t.bytes = bytes;
    return t;
  };
  EXPECT_TRUE(T(rx, 0, 16).Overlaps(T(ry, 4096, 16)));     // object byte 4096 in both
  EXPECT_TRUE(T(ry, 4100, 100).Overlaps(T(rx, 0, 16)));
  EXPECT_FALSE(T(rx, 0, 16).Overlaps(T(ry, 0, 4096)));     // y's first page is not in x
  EXPECT_FALSE(T(rx, 16, 16).Overlaps(T(ry, 4096, 16)));   // adjacent in the object
  testing_util::ShmObject other(4096);
  auto z = HostRegion::Open("z", other.key(), 0, 4096);
  ASSERT_TRUE(z.ok());
  EXPECT_FALSE(T(ry, 0, 4096).Overlaps(T(*std::move(z), 0, 4096)));  // another object
}

// ---- Wire dtype names ----

TEST(DTypeNameTest, NamesEveryDtypeAndUnspecified) {
  EXPECT_STREQ(DTypeName(kF16), "float16");
  EXPECT_STREQ(DTypeName(kBf16), "bfloat16");
  EXPECT_STREQ(DTypeName(kF32), "float32");
  EXPECT_STREQ(DTypeName(std::nullopt), "unspecified");
}

}  // namespace
}  // namespace attnd
