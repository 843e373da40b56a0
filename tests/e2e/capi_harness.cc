#include "tests/e2e/capi_harness.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <thread>

#include "absl/strings/str_cat.h"
#include "client/half.h"
#include "google/protobuf/descriptor.h"
#include "google/protobuf/descriptor.pb.h"
#include "google/protobuf/dynamic_message.h"

namespace attnd::testing {
namespace {

using google::protobuf::Message;

std::string Env(const char* name, const char* fallback) {
  const char* v = getenv(name);
  return v != nullptr ? v : fallback;
}

// attnd.v1.ServerInfo in a pool of the test's own: apart from libprotobuf's generated pool, where
// libattnd_c.so's copy lives, so the two never meet.
const google::protobuf::Descriptor* ServerInfoType() {
  static google::protobuf::DescriptorPool pool;
  static const google::protobuf::Descriptor* type = []() -> const google::protobuf::Descriptor* {
    std::ifstream in(Env("ATTND_CAPI_DESCRIPTORS", ATTND_CAPI_DESCRIPTORS), std::ios::binary);
    google::protobuf::FileDescriptorSet set;
    if (!set.ParseFromIstream(&in)) return nullptr;
    for (const auto& file : set.file()) {
      if (pool.BuildFile(file) == nullptr) return nullptr;
    }
    return pool.FindMessageTypeByName("attnd.v1.ServerInfo");
  }();
  return type;
}

// A field the tests read; a missing one means the descriptor set and the tests disagree.
const google::protobuf::FieldDescriptor* Field(const Message& m, const char* name) {
  const google::protobuf::FieldDescriptor* f = m.GetDescriptor()->FindFieldByName(name);
  if (f == nullptr) {
    fprintf(stderr, "%s has no field %s\n", m.GetTypeName().c_str(), name);
    abort();
  }
  return f;
}

// An integer, enum or float field of m as a double.
double Number(const Message& m, const char* name) {
  const auto* f = Field(m, name);
  const auto* r = m.GetReflection();
  switch (f->cpp_type()) {
    case google::protobuf::FieldDescriptor::CPPTYPE_UINT32: return r->GetUInt32(m, f);
    case google::protobuf::FieldDescriptor::CPPTYPE_INT32: return r->GetInt32(m, f);
    case google::protobuf::FieldDescriptor::CPPTYPE_UINT64: return r->GetUInt64(m, f);
    case google::protobuf::FieldDescriptor::CPPTYPE_ENUM: return r->GetEnumValue(m, f);
    case google::protobuf::FieldDescriptor::CPPTYPE_FLOAT: return r->GetFloat(m, f);
    case google::protobuf::FieldDescriptor::CPPTYPE_BOOL: return r->GetBool(m, f);
    default: abort();
  }
}

size_t ElemSize(int dtype) { return dtype == ATTND_DTYPE_FLOAT32 ? 4 : 2; }

void Store(int dtype, float x, uint8_t* dst) {
  if (dtype == ATTND_DTYPE_FLOAT32) {
    memcpy(dst, &x, 4);
    return;
  }
  const uint16_t bits = dtype == ATTND_DTYPE_FLOAT16 ? client::FloatToHalfBits(x)
                                                     : client::FloatToBFloat16Bits(x);
  memcpy(dst, &bits, 2);
}

float Load(int dtype, const uint8_t* src) {
  if (dtype == ATTND_DTYPE_FLOAT32) {
    float x;
    memcpy(&x, src, 4);
    return x;
  }
  uint16_t bits;
  memcpy(&bits, src, 2);
  return dtype == ATTND_DTYPE_FLOAT16 ? client::HalfBitsToFloat(bits)
                                      : client::BFloat16BitsToFloat(bits);
}

attnd_tensor Tensor(const char* region, uint64_t offset, int dtype,
                    std::initializer_list<uint64_t> shape) {
  attnd_tensor t{region, offset, dtype, static_cast<int32_t>(shape.size()), {}};
  std::copy(shape.begin(), shape.end(), t.shape);
  return t;
}

}  // namespace

// ---- CApiServer ----

CApiServer::CApiServer() {
  static int counter = 0;
  const std::string stem = absl::StrCat("/tmp/attnd-capi-", getpid(), "-", counter++);
  log_ = stem + ".log";
  target_ = "unix://" + stem + ".sock";
  std::vector<std::string> args = {
      Env("ATTND_BINARY", ATTND_BINARY), "--backend=" + Env("ATTND_E2E_BACKEND", "cpu"),
      "--num_layers=2", "--num_qo_heads=8", "--num_kv_heads=2", "--head_dim=64",
      "--dtype=bf16", "--page_size=16", "--pages_per_device=2048", "--metrics_port=0",
      "--kv_scale_setters=*",
      "--unix_socket=" + stem + ".sock"};
  std::vector<char*> argv;
  for (std::string& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  pid_ = fork();
  if (pid_ == 0) {
    const int fd = open(log_.c_str(), O_CREAT | O_TRUNC | O_WRONLY, 0644);
    dup2(fd, STDERR_FILENO);
    dup2(fd, STDOUT_FILENO);
    execv(argv[0], argv.data());
    _exit(127);
  }
}

CApiServer::~CApiServer() {
  if (pid_ > 0) {
    kill(pid_, SIGTERM);
    int status = 0;
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
    while (waitpid(pid_, &status, WNOHANG) != pid_) {
      if (std::chrono::steady_clock::now() > deadline) {
        kill(pid_, SIGKILL);
        waitpid(pid_, &status, 0);
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  }
  if (getenv("ATTND_E2E_KEEP_LOGS") == nullptr) unlink(log_.c_str());
}

bool CApiServer::WaitListening() {
  for (int i = 0; i < 6000; ++i) {
    int status = 0;
    if (pid_ <= 0 || waitpid(pid_, &status, WNOHANG) == pid_) {
      pid_ = -1;  // exited during start-up: the log says why
      return false;
    }
    if (Log().find("level=info listening ") != std::string::npos) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return false;
}

std::string CApiServer::Log() const {
  std::stringstream ss;
  ss << std::ifstream(log_).rdbuf();
  return ss.str();
}

// ---- ServerInfo ----

bool ParseInfo(const std::vector<uint8_t>& bytes, Info* info) {
  static google::protobuf::DynamicMessageFactory factory;
  if (ServerInfoType() == nullptr) return false;
  std::unique_ptr<Message> msg(factory.GetPrototype(ServerInfoType())->New());
  if (!msg->ParseFromArray(bytes.data(), static_cast<int>(bytes.size()))) return false;
  const Message& m = msg->GetReflection()->GetMessage(*msg, Field(*msg, "model"));
  info->num_layers = Number(m, "num_layers");
  info->num_qo_heads = Number(m, "num_qo_heads");
  info->num_kv_heads = Number(m, "num_kv_heads");
  info->head_dim = Number(m, "head_dim");
  info->page_size = Number(m, "page_size");
  info->dtype = static_cast<int>(Number(m, "dtype"));
  // client::ParamsFromModel takes the generated ModelConfig, which this process may not hold.
  info->params = {info->num_qo_heads, info->num_kv_heads, info->head_dim,
                  Number(m, "sm_scale"), Number(m, "logits_soft_cap"),
                  static_cast<int64_t>(Number(m, "window_left"))};
  const auto* devices = Field(*msg, "devices");
  info->serving = msg->GetReflection()->FieldSize(*msg, devices) > 0 &&
                  Number(msg->GetReflection()->GetRepeatedMessage(*msg, devices, 0), "serving");
  return true;
}

// ---- CApiWorkload ----

int CApiWorkload::Register(attnd_client* client, char* err) {
  const uint64_t elem = ElemSize(info_.dtype);
  const uint64_t q_bytes = kMaxRows * info_.num_qo_heads * info_.head_dim * elem;
  const uint64_t kv_bytes = kMaxRows * info_.num_kv_heads * info_.head_dim * elem;
  const uint64_t lse_bytes = kMaxRows * info_.num_qo_heads * 4;
  const uint64_t slot_bytes = 2 * q_bytes + 2 * kv_bytes + lse_bytes;
  for (size_t i = 0; i < kSlots; ++i) {
    const uint64_t base = i * slot_bytes;
    Slot& slot = slots_[i];
    slot.q = base;
    slot.k = slot.q + q_bytes;
    slot.v = slot.k + kv_bytes;
    slot.out = slot.v + kv_bytes;
    slot.lse = slot.out + q_bytes;
  }
  auto shm = client::SharedMemoryBuffer::Create(client::SharedMemoryBuffer::UniqueKey("capi"),
                                                kSlots * slot_bytes);
  if (!shm.ok()) {
    snprintf(err, kErrLen, "%s", shm.status().ToString().c_str());
    return -1;
  }
  shm_ = *std::move(shm);
  return attnd_register_host_region(client, "main", shm_->key().c_str(), 0, shm_->size(), err,
                                    kErrLen);
}

attnd_call CApiWorkload::Build(int op, size_t s, uint32_t layer, std::vector<attnd_item> items,
                               bool with_lse, bool expect_ok) {
  Slot& slot = slots_[s];
  const uint64_t qo_row = info_.num_qo_heads * info_.head_dim;
  const uint64_t kv_row = info_.num_kv_heads * info_.head_dim;
  uint64_t rows = 0;
  for (const attnd_item& item : items) rows += item.num_new_tokens;
  const std::vector<float> q = Random(slot.q, rows * qo_row);
  const std::vector<float> k = Random(slot.k, rows * kv_row);
  const std::vector<float> v = Random(slot.v, rows * kv_row);
  memset(bytes() + slot.out, 0xff, rows * qo_row * ElemSize(info_.dtype));
  memset(bytes() + slot.lse, 0xff, rows * info_.num_qo_heads * 4);
  slot.items = std::move(items);
  slot.with_lse = with_lse;
  slot.ref_out.assign(rows * qo_row, 0);
  slot.ref_lse.assign(rows * info_.num_qo_heads, 0);
  slot.lengths.clear();
  uint64_t row = 0;
  for (const attnd_item& item : slot.items) {
    const uint64_t n = item.num_new_tokens;
    if (expect_ok) {
      auto& [hk, hv] = history_[item.seq_id][layer];
      hk.insert(hk.end(), k.begin() + row * kv_row, k.begin() + (row + n) * kv_row);
      hv.insert(hv.end(), v.begin() + row * kv_row, v.begin() + (row + n) * kv_row);
      slot.lengths.push_back(hk.size() / kv_row);
      if (op != ATTND_OP_APPEND) {
        client::DenseAttentionReference(info_.params, q.data() + row * qo_row, n, hk.data(),
                                        hv.data(), hk.size() / kv_row,
                                        slot.ref_out.data() + row * qo_row,
                                        slot.ref_lse.data() + row * info_.num_qo_heads);
      }
    }
    row += n;
  }
  attnd_call call{};
  call.op = op;
  call.layer = layer;
  call.items = slot.items.data();
  call.num_items = slot.items.size();
  const int dt = info_.dtype;
  call.q = Tensor("main", slot.q, dt, {rows, info_.num_qo_heads, info_.head_dim});
  call.k_new = Tensor("main", slot.k, dt, {rows, info_.num_kv_heads, info_.head_dim});
  call.v_new = Tensor("main", slot.v, dt, {rows, info_.num_kv_heads, info_.head_dim});
  call.out = Tensor("main", slot.out, dt, {rows, info_.num_qo_heads, info_.head_dim});
  if (with_lse) call.lse = Tensor("main", slot.lse, ATTND_DTYPE_FLOAT32, {rows, info_.num_qo_heads});
  return call;
}

::testing::AssertionResult CApiWorkload::Check(size_t s, bool wrote_outputs,
                                                const uint64_t* lengths, size_t num_lengths) {
  const Slot& slot = slots_[s];
  if (std::vector<uint64_t>(lengths, lengths + num_lengths) != slot.lengths)
    return ::testing::AssertionFailure() << "lengths differ from the client's history";
  if (!wrote_outputs) return ::testing::AssertionSuccess();
  std::vector<float> out(slot.ref_out.size()), lse(slot.ref_lse.size());
  for (size_t i = 0; i < out.size(); ++i)
    out[i] = Load(info_.dtype, bytes() + slot.out + i * ElemSize(info_.dtype));
  memcpy(lse.data(), bytes() + slot.lse, lse.size() * 4);
  const double tol = info_.dtype == ATTND_DTYPE_FLOAT32   ? 1e-4
                     : info_.dtype == ATTND_DTYPE_FLOAT16 ? 2e-3
                                                          : 1e-2;
  const double err = client::RelativeL2Error(out, slot.ref_out);
  if (!(err < tol)) return ::testing::AssertionFailure() << "out: relative error " << err;
  const double lse_err = slot.with_lse ? client::MaxAbsError(lse, slot.ref_lse) : 0;
  if (!(lse_err < 1e-2)) return ::testing::AssertionFailure() << "lse: error " << lse_err;
  return ::testing::AssertionSuccess();
}

void CApiWorkload::Truncate(uint64_t seq_id, uint64_t length) {
  const uint64_t keep = length * info_.num_kv_heads * info_.head_dim;
  for (auto& layer : history_[seq_id]) {
    auto& [k, v] = layer.second;
    if (k.size() > keep) {
      k.resize(keep);
      v.resize(keep);
    }
  }
}

std::vector<float> CApiWorkload::Random(uint64_t offset, uint64_t n) {
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> values(n);
  const size_t elem = ElemSize(info_.dtype);
  for (uint64_t i = 0; i < n; ++i) {
    Store(info_.dtype, dist(rng_), bytes() + offset + i * elem);
    values[i] = Load(info_.dtype, bytes() + offset + i * elem);
  }
  return values;
}

}  // namespace attnd::testing
