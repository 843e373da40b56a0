// The gRPC face of the engine: attnd.v1.Attention on the callback API. One named handler per
// RPC converts the request (server/wire/convert.h), hands it to the engine, and from the
// engine's reply fills the response, records the call's metrics and finishes its reactor.
#ifndef ATTND_SERVER_WIRE_SERVICE_H_
#define ATTND_SERVER_WIRE_SERVICE_H_

#include "attnd/v1/attention.grpc.pb.h"
#include "server/engine/engine.h"
#include "server/metrics/metrics.h"
#include "server/wire/identity.h"
#include "server/wire/kv_transfer.h"

namespace attnd {

// attnd.v1.Attention on the callback API, except Stream, whose messages attnd parses itself:
// gRPC ends a stream whose client sent an unparsable message as if the client had half-closed
// (status OK, later requests unanswered); attnd ends it with INVALID_ARGUMENT instead. This is
// the generated CallbackService chain with Stream's link made raw.
using A = v1::Attention;
using AttentionServiceBase = A::WithCallbackMethod_GetServerInfo<A::WithCallbackMethod_GetStats<
    A::WithCallbackMethod_RegisterCudaRegion<A::WithCallbackMethod_RegisterHostRegion<
    A::WithCallbackMethod_UnregisterRegion<A::WithCallbackMethod_ListRegions<
    A::WithCallbackMethod_RegisterCudaEvent<A::WithCallbackMethod_UnregisterCudaEvent<
    A::WithCallbackMethod_CreateSequence<A::WithCallbackMethod_ForkSequence<
    A::WithCallbackMethod_TruncateSequence<A::WithCallbackMethod_ReleaseSequence<
    A::WithCallbackMethod_GetSequence<A::WithCallbackMethod_ListSequences<
    A::WithCallbackMethod_Append<A::WithCallbackMethod_Prefill<A::WithCallbackMethod_Decode<
    A::WithRawCallbackMethod_Stream<A::WithCallbackMethod_ExportKv<A::WithCallbackMethod_ImportKv<
    A::WithCallbackMethod_GetLease<A::WithCallbackMethod_ReleaseAll<
    A::WithCallbackMethod_GrantKv<A::WithCallbackMethod_RevokeKv<A::WithCallbackMethod_PullKv<
    A::WithCallbackMethod_OpenKvPull<A::WithCallbackMethod_CloseKvPull<
    A::WithCallbackMethod_SetKvScales<A::Service>>>>>>>>>>>>>>>>>>>>>>>>>>>>;

class AttentionService final : public AttentionServiceBase {
 public:
  // Every call acts for the client `auth` identifies (its lease renewed by the call).
  AttentionService(Engine* engine, Metrics* metrics, const wire::Authenticator* auth)
      : engine_(engine), metrics_(metrics), auth_(auth) {}
  // KV transfer between attnd processes; without it those RPCs are FAILED_PRECONDITION.
  void SetKvTransfer(wire::KvTransfer* kv_transfer) { kv_transfer_ = kv_transfer; }

  grpc::ServerUnaryReactor* GetServerInfo(grpc::CallbackServerContext* ctx,
                                          const v1::GetServerInfoRequest* req,
                                          v1::ServerInfo* resp) override;
  grpc::ServerUnaryReactor* GetStats(grpc::CallbackServerContext* ctx,
                                     const v1::GetStatsRequest* req, v1::Stats* resp) override;
  grpc::ServerUnaryReactor* RegisterCudaRegion(grpc::CallbackServerContext* ctx,
                                               const v1::RegisterCudaRegionRequest* req,
                                               v1::RegisterRegionResponse* resp) override;
  grpc::ServerUnaryReactor* RegisterHostRegion(grpc::CallbackServerContext* ctx,
                                               const v1::RegisterHostRegionRequest* req,
                                               v1::RegisterRegionResponse* resp) override;
  grpc::ServerUnaryReactor* UnregisterRegion(grpc::CallbackServerContext* ctx,
                                             const v1::UnregisterRegionRequest* req,
                                             v1::UnregisterRegionResponse* resp) override;
  grpc::ServerUnaryReactor* ListRegions(grpc::CallbackServerContext* ctx,
                                        const v1::ListRegionsRequest* req,
                                        v1::ListRegionsResponse* resp) override;
  grpc::ServerUnaryReactor* RegisterCudaEvent(grpc::CallbackServerContext* ctx,
                                              const v1::RegisterCudaEventRequest* req,
                                              v1::RegisterCudaEventResponse* resp) override;
  grpc::ServerUnaryReactor* UnregisterCudaEvent(grpc::CallbackServerContext* ctx,
                                                const v1::UnregisterCudaEventRequest* req,
                                                v1::UnregisterCudaEventResponse* resp) override;
  grpc::ServerUnaryReactor* CreateSequence(grpc::CallbackServerContext* ctx,
                                           const v1::CreateSequenceRequest* req,
                                           v1::SequenceInfo* resp) override;
  grpc::ServerUnaryReactor* ForkSequence(grpc::CallbackServerContext* ctx,
                                         const v1::ForkSequenceRequest* req,
                                         v1::SequenceInfo* resp) override;
  grpc::ServerUnaryReactor* TruncateSequence(grpc::CallbackServerContext* ctx,
                                             const v1::TruncateSequenceRequest* req,
                                             v1::SequenceInfo* resp) override;
  grpc::ServerUnaryReactor* ReleaseSequence(grpc::CallbackServerContext* ctx,
                                            const v1::ReleaseSequenceRequest* req,
                                            v1::ReleaseSequenceResponse* resp) override;
  grpc::ServerUnaryReactor* GetSequence(grpc::CallbackServerContext* ctx,
                                        const v1::GetSequenceRequest* req,
                                        v1::SequenceInfo* resp) override;
  grpc::ServerUnaryReactor* ListSequences(grpc::CallbackServerContext* ctx,
                                          const v1::ListSequencesRequest* req,
                                          v1::ListSequencesResponse* resp) override;
  grpc::ServerUnaryReactor* Append(grpc::CallbackServerContext* ctx,
                                   const v1::AppendRequest* req,
                                   v1::AppendResponse* resp) override;
  grpc::ServerUnaryReactor* Prefill(grpc::CallbackServerContext* ctx,
                                    const v1::AttentionRequest* req,
                                    v1::AttentionResponse* resp) override;
  grpc::ServerUnaryReactor* Decode(grpc::CallbackServerContext* ctx,
                                   const v1::AttentionRequest* req,
                                   v1::AttentionResponse* resp) override;
  grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* Stream(
      grpc::CallbackServerContext* ctx) override;
  grpc::ServerUnaryReactor* ExportKv(grpc::CallbackServerContext* ctx,
                                     const v1::ExportKvRequest* req,
                                     v1::ExportKvResponse* resp) override;
  grpc::ServerUnaryReactor* ImportKv(grpc::CallbackServerContext* ctx,
                                     const v1::ImportKvRequest* req,
                                     v1::ImportKvResponse* resp) override;
  grpc::ServerUnaryReactor* GetLease(grpc::CallbackServerContext* ctx,
                                     const v1::GetLeaseRequest* req, v1::LeaseInfo* resp) override;
  grpc::ServerUnaryReactor* ReleaseAll(grpc::CallbackServerContext* ctx,
                                       const v1::ReleaseAllRequest* req,
                                       v1::ReleaseAllResponse* resp) override;
  grpc::ServerUnaryReactor* GrantKv(grpc::CallbackServerContext* ctx,
                                    const v1::GrantKvRequest* req, v1::KvGrant* resp) override;
  grpc::ServerUnaryReactor* RevokeKv(grpc::CallbackServerContext* ctx,
                                     const v1::RevokeKvRequest* req,
                                     v1::RevokeKvResponse* resp) override;
  grpc::ServerUnaryReactor* PullKv(grpc::CallbackServerContext* ctx,
                                   const v1::PullKvRequest* req,
                                   v1::PullKvResponse* resp) override;
  grpc::ServerUnaryReactor* OpenKvPull(grpc::CallbackServerContext* ctx,
                                       const v1::OpenKvPullRequest* req,
                                       v1::OpenKvPullResponse* resp) override;
  grpc::ServerUnaryReactor* CloseKvPull(grpc::CallbackServerContext* ctx,
                                        const v1::CloseKvPullRequest* req,
                                        v1::CloseKvPullResponse* resp) override;
  grpc::ServerUnaryReactor* SetKvScales(grpc::CallbackServerContext* ctx,
                                        const v1::SetKvScalesRequest* req,
                                        v1::SetKvScalesResponse* resp) override;

 private:
  // OpenKvPull and CloseKvPull: the caller must be in --kv_peers.
  absl::Status CheckPeer(const grpc::CallbackServerContext* ctx) const;
  // PERMISSION_DENIED unless the caller is in --kv_scale_setters.
  absl::Status CheckScaleSetter(const grpc::CallbackServerContext* ctx) const;
  grpc::ServerUnaryReactor* Attention(grpc::CallbackServerContext* ctx,
                                      const v1::AttentionRequest* req,
                                      v1::AttentionResponse* resp, bool decode);
  // The caller's client, its lease renewed; UNAUTHENTICATED or INVALID_ARGUMENT otherwise.
  absl::StatusOr<ClientRef> ClientOf(const grpc::CallbackServerContext* ctx) const;

  Engine* const engine_;
  Metrics* const metrics_;
  const wire::Authenticator* const auth_;
  wire::KvTransfer* kv_transfer_ = nullptr;
};

}  // namespace attnd

#endif  // ATTND_SERVER_WIRE_SERVICE_H_
